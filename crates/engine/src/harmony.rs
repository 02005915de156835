//! The harmony output format of GPT-OSS: after the prompt's `<|start|>assistant` the model
//! writes messages `<|channel|>NAME<|message|>TEXT<|end|>`, each but the first opened by
//! `<|start|>assistant`, and ends with `<|return|>` (or `<|call|>` for a tool call). The
//! `final` channel is the answer; `analysis` (reasoning) and `commentary` (tool preambles and
//! calls) are not. [`HarmonySplitter`] routes each generated token to its channel and swallows
//! the markers and headers, so front ends print the answer and keep the reasoning apart.

use ollm_tokenizer::Tokenizer;

/// Token ids of the harmony markers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HarmonyMarkers {
    pub start: u32,
    pub end: u32,
    pub message: u32,
    pub channel: u32,
    pub constrain: u32,
    pub ret: u32,
    pub call: u32,
}

impl HarmonyMarkers {
    /// The markers, when the tokenizer has every one of them as a single token (o200k_harmony).
    pub fn from_tokenizer(tok: &Tokenizer) -> Option<Self> {
        let id = |s: &str| tok.token_to_id(s);
        Some(Self {
            start: id("<|start|>")?,
            end: id("<|end|>")?,
            message: id("<|message|>")?,
            channel: id("<|channel|>")?,
            constrain: id("<|constrain|>")?,
            ret: id("<|return|>")?,
            call: id("<|call|>")?,
        })
    }
}

/// Where a generated token's text goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// The answer (`final`, or a message with no channel).
    Final,
    /// Everything else (`analysis`, `commentary`).
    Reasoning,
}

/// What one generated token is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Routed {
    /// A marker or part of a message header: no text.
    Header,
    Text(Channel),
    /// The tokens taken as a header so far were answer text after all (the model is not
    /// writing harmony): these, the current one last.
    Replay(Vec<u32>),
}

/// A header this long without `<|message|>` means the model is not writing harmony: what
/// follows is taken as answer text.
const MAX_HEADER: usize = 64;

#[derive(Debug)]
enum State {
    /// Inside a header (role, `<|channel|>` name, recipient, constraint); `naming` while the
    /// channel name is being written.
    Header {
        naming: bool,
        len: usize,
    },
    Body(Channel),
}

/// Follows the generated tokens through harmony messages.
#[derive(Debug)]
pub struct HarmonySplitter {
    m: HarmonyMarkers,
    state: State,
    /// The current header's channel name tokens (None: no `<|channel|>` yet).
    name: Option<Vec<u32>>,
    /// Every token of the current header, in case it turns out to be text.
    header: Vec<u32>,
}

impl HarmonySplitter {
    /// A splitter for a generation that starts right after `<|start|>assistant`.
    pub fn new(m: HarmonyMarkers) -> Self {
        Self { m, state: State::Header { naming: false, len: 0 }, name: None, header: Vec::new() }
    }

    /// Routes the next generated token.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> crate::Result<Routed> {
        let m = self.m;
        match &mut self.state {
            State::Body(ch) => {
                let ch = *ch;
                if id == m.end || id == m.start {
                    self.state = State::Header { naming: false, len: 0 };
                    self.name = None;
                    self.header.clear();
                    Ok(Routed::Header)
                } else if id == m.ret || id == m.call {
                    Ok(Routed::Header)
                } else {
                    Ok(Routed::Text(ch))
                }
            }
            State::Header { naming, len } => {
                *len += 1;
                self.header.push(id);
                if id == m.message {
                    let channel = match &self.name {
                        Some(ids) if !is_final(&tok.decode(ids, false)?) => Channel::Reasoning,
                        _ => Channel::Final,
                    };
                    self.state = State::Body(channel);
                } else if id == m.channel {
                    *naming = true;
                    self.name = Some(Vec::new());
                } else if id == m.constrain || id == m.start {
                    *naming = false;
                } else if *len > MAX_HEADER {
                    self.state = State::Body(Channel::Final);
                    return Ok(Routed::Replay(std::mem::take(&mut self.header)));
                } else if *naming && let Some(name) = &mut self.name {
                    name.push(id);
                }
                Ok(Routed::Header)
            }
        }
    }
}

/// Whether a channel name (maybe followed by ` to=…`) is `final`.
fn is_final(name: &str) -> bool {
    name.split_whitespace().next() == Some("final")
}
