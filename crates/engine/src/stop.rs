//! Stop strings on a text stream: text is released only once it cannot be the start of a stop
//! string, and the stop string itself is never emitted.

/// Owns the stop strings and the text held back while it might begin one of them.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

/// Result of feeding a piece of text.
#[derive(Debug, PartialEq, Eq)]
pub enum StopOutcome {
    /// Text safe to emit now (possibly empty).
    Continue(String),
    /// A stop string was found: emit this text (before it) and stop.
    Stopped(String),
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        Self { stops: stops.into_iter().filter(|s| !s.is_empty()).collect(), held: String::new() }
    }

    pub fn push(&mut self, piece: &str) -> StopOutcome {
        self.held.push_str(piece);
        if let Some(at) = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min() {
            let out = self.held[..at].to_string();
            self.held.clear();
            return StopOutcome::Stopped(out);
        }
        // Hold back the longest suffix that is a proper prefix of some stop string.
        let keep = self
            .stops
            .iter()
            .flat_map(|s| (1..s.len()).filter(|&n| s.is_char_boundary(n)).map(move |n| &s[..n]))
            .filter(|p| self.held.ends_with(p))
            .map(str::len)
            .max()
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_string();
        self.held.drain(..cut);
        StopOutcome::Continue(out)
    }

    /// Text held back when generation ends for another reason.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_split_across_pieces_is_not_emitted() {
        let mut m = StopMatcher::new(vec!["\nUser:".into()]);
        assert_eq!(m.push("Hello"), StopOutcome::Continue("Hello".into()));
        assert_eq!(m.push(" there\nUs"), StopOutcome::Continue(" there".into()));
        assert_eq!(m.push("er: hi"), StopOutcome::Stopped(String::new()));
    }

    #[test]
    fn false_alarm_is_released_and_finish_flushes() {
        let mut m = StopMatcher::new(vec!["END".into(), "STOP".into()]);
        assert_eq!(m.push("xEN"), StopOutcome::Continue("x".into()));
        assert_eq!(m.push("Dless"), StopOutcome::Stopped(String::new()));
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("aE"), StopOutcome::Continue("a".into()));
        assert_eq!(m.push("x"), StopOutcome::Continue("Ex".into()));
        assert_eq!(m.push("abcS"), StopOutcome::Continue("abcS".into()));
        assert_eq!(m.push("EN"), StopOutcome::Continue(String::new()));
        assert_eq!(m.finish(), "EN");
    }
}
