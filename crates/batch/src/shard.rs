//! Sharding one batch job over many machines, and joining the shards' results.
//!
//! `--shard I/N` keeps the requests whose id hashes to `I` modulo `N` (64-bit FNV-1a of the id's
//! key), so the split depends on nothing but the ids: every shard of a job, on any machine, in any
//! run, agrees on which ids are whose, and a resumed shard skips exactly its own finished ids.
//! Each shard writes its own results file ([`Shard::path_for`]). [`merge`] joins the parts,
//! reporting ids that are missing (with the input) or that more than one part holds.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::BatchError;
use crate::reader::{id_key, read_requests};
use crate::writer::JsonlLog;

/// One shard of a job: `index` of `count`, `0 <= index < count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    /// Parses `I/N` (`0 <= I < N`).
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = || format!("--shard {text:?}: give I/N with 0 <= I < N, e.g. 0/4 (the first of four shards)");
        let (i, n) = text.split_once('/').ok_or_else(bad)?;
        let (index, count) =
            (i.trim().parse::<usize>().map_err(|_| bad())?, n.trim().parse::<usize>().map_err(|_| bad())?);
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }

    /// Whether the request with this id key belongs to this shard.
    pub fn owns(&self, key: &str) -> bool {
        fnv1a(key.as_bytes()) % self.count as u64 == self.index as u64
    }

    /// This shard's own file for `path`: `results.jsonl` → `results.shard-2-of-8.jsonl`.
    pub fn path_for(&self, path: &Path) -> PathBuf {
        let stem = path.file_stem().map_or_else(|| "out".into(), |s| s.to_string_lossy().into_owned());
        let name = match path.extension() {
            Some(ext) => format!("{stem}.shard-{}-of-{}.{}", self.index, self.count, ext.to_string_lossy()),
            None => format!("{stem}.shard-{}-of-{}", self.index, self.count),
        };
        path.with_file_name(name)
    }
}

/// 64-bit FNV-1a: stable across runs, machines and Rust versions.
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// What [`merge`] found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MergeReport {
    /// Results written to the merged file (one per id).
    pub written: usize,
    /// Ids found in more than one line of the parts (the first is kept), with how many lines.
    pub duplicated: Vec<(String, usize)>,
    /// With an input: its ids that no part holds, in input order.
    pub missing: Vec<String>,
    /// Lines of the parts that are not a result with an id (a torn last line, say), by file.
    pub unreadable: Vec<(PathBuf, usize)>,
}

/// Joins the shards' result files `parts` into `out` (created; it must not exist), one line per
/// id: in the input's order when `input` is given (and then its ids that no part holds are
/// reported missing), else in the parts' order. Nothing in the parts is changed.
pub fn merge(out: &Path, parts: &[PathBuf], input: Option<&Path>) -> Result<MergeReport, BatchError> {
    if out.exists() {
        return Err(BatchError::Io {
            path: out.to_path_buf(),
            detail: "exists already; merge writes a new file (remove it or give another OUT)".into(),
        });
    }
    let mut report = MergeReport::default();
    let mut lines: Vec<(String, Value)> = Vec::new();
    let mut count: HashMap<String, usize> = HashMap::new();
    for part in parts {
        let text = std::fs::read_to_string(part).map_err(|e| BatchError::io(part, "read a shard's results", &e))?;
        for (n, line) in text.lines().enumerate() {
            let parsed = serde_json::from_str::<Value>(line).ok();
            let Some((key, value)) = parsed.and_then(|v| id_key(&v["id"]).map(|k| (k, v))) else {
                if !line.trim().is_empty() {
                    report.unreadable.push((part.clone(), n + 1));
                }
                continue;
            };
            let c = count.entry(key.clone()).or_insert(0);
            *c += 1;
            if *c == 1 {
                lines.push((key, value));
            }
        }
    }
    report.duplicated = count.into_iter().filter(|(_, c)| *c > 1).collect();
    report.duplicated.sort();
    if let Some(input) = input {
        let (requests, _) = read_requests(input)?;
        let mut order: Vec<String> = Vec::new();
        let mut seen = HashSet::new();
        for r in &requests {
            if let Some(k) = id_key(&r.id).filter(|k| seen.insert(k.clone())) {
                order.push(k);
            }
        }
        let mut by_key: HashMap<String, Value> = lines.into_iter().collect();
        lines = Vec::new();
        for k in order {
            match by_key.remove(&k) {
                Some(v) => lines.push((k, v)),
                None => report.missing.push(k),
            }
        }
        // Results whose id the input does not have still go in, after the input's.
        let mut rest: Vec<(String, Value)> = by_key.into_iter().collect();
        rest.sort_by(|a, b| a.0.cmp(&b.0));
        lines.extend(rest);
    }
    let mut log = JsonlLog::create(out)?;
    for (_, v) in &lines {
        log.append(v)?;
    }
    report.written = lines.len();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_parse_and_split_ids_once() {
        assert_eq!(Shard::parse("2/8"), Ok(Shard { index: 2, count: 8 }));
        for bad in ["8/8", "1/0", "x/2", "3", "-1/4"] {
            assert!(Shard::parse(bad).is_err(), "{bad}");
        }
        let shards: Vec<Shard> = (0..5).map(|index| Shard { index, count: 5 }).collect();
        for id in 0..1000 {
            let key = format!("doc-{id}");
            assert_eq!(shards.iter().filter(|s| s.owns(&key)).count(), 1, "{key}");
        }
        // The split is the hash's, not the run's: a fixed id always lands in the same shard.
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        let s = Shard { index: 2, count: 8 };
        assert_eq!(s.path_for(Path::new("/x/results.jsonl")), Path::new("/x/results.shard-2-of-8.jsonl"));
        assert_eq!(s.path_for(Path::new("out")), Path::new("out.shard-2-of-8"));
    }

    #[test]
    fn merge_reports_missing_and_duplicated_ids() {
        let dir = tempfile::tempdir().expect("temp dir");
        let p = |n: &str| dir.path().join(n);
        std::fs::write(
            p("in.jsonl"),
            "{\"id\":\"a\",\"prompt\":\"x\"}\n{\"id\":2,\"prompt\":\"y\"}\n{\"id\":\"c\",\"prompt\":\"z\"}\n",
        )
        .expect("input");
        std::fs::write(
            p("s0.jsonl"),
            "{\"id\":2,\"text\":\"two\"}\n{\"id\":\"a\",\"text\":\"A\"}\n{\"id\":\"a\",\"text\":\"again\"}\n{\"id\":",
        )
        .expect("part 0");
        std::fs::write(p("s1.jsonl"), "{\"id\":\"z\",\"text\":\"extra\"}\n").expect("part 1");
        let r = merge(&p("all.jsonl"), &[p("s0.jsonl"), p("s1.jsonl")], Some(&p("in.jsonl"))).expect("merge");
        assert_eq!(r.missing, vec!["c".to_string()]);
        assert_eq!(r.duplicated, vec![("a".to_string(), 2)]);
        assert_eq!(r.unreadable, vec![(p("s0.jsonl"), 4)]);
        assert_eq!(r.written, 3);
        let merged = std::fs::read_to_string(p("all.jsonl")).expect("merged");
        let ids: Vec<String> = merged
            .lines()
            .map(|l| id_key(&serde_json::from_str::<Value>(l).expect("json")["id"]).expect("id"))
            .collect();
        assert_eq!(ids, ["a", "2", "z"], "input order, then ids the input lacks");
        assert!(merged.contains("\"A\"") && !merged.contains("again"), "the first line of a duplicated id is kept");
        assert!(merge(&p("all.jsonl"), &[p("s1.jsonl")], None).is_err(), "an existing OUT is not overwritten");
    }
}
