//! A campaign's journal: one JSON object a line beside the plan
//! (`PLAN.journal`), each appended and synced to disk before the campaign
//! takes its next step, so a campaign killed at any point resumes where it
//! was: no VM changed twice, none skipped.

use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A health check's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    /// `alive`, `log`, `patch`, `command` (or `step` for the step itself).
    pub check: String,
    /// Passed.
    pub ok: bool,
    /// What was seen.
    pub detail: String,
}

/// What became of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// Not reached yet.
    Pending,
    /// Its step began and did not end (the campaign was killed in it):
    /// it may have been changed; a resumed run finishes its step.
    InFlight,
    /// Its step was done (or found done already) and it is healthy.
    Patched,
    /// Its step or a health check failed.
    Failed,
    /// Its step was undone by a rollback.
    RolledBack,
    /// Its VMM was gone: reported, not retried.
    Gone,
}

/// One line of the journal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Entry {
    /// The campaign began: its plan and its VMs, wave by wave (fixed for
    /// its whole life, whatever VMs come and go later).
    Start {
        /// Unix time, ms.
        at: u64,
        /// SHA-256 of the plan's text.
        digest: String,
        /// Plan name.
        name: String,
        /// VM ids per wave.
        waves: Vec<Vec<String>>,
        /// Each wave's settings.
        settings: Vec<super::plan::Wave>,
        /// The plan's patches (names), in order.
        #[serde(default)]
        patches: Vec<String>,
    },
    /// A run (the first or a resumption) took over.
    Run {
        /// Unix time, ms.
        at: u64,
        /// The campaign process.
        pid: u32,
    },
    /// About to change a VM.
    Begin {
        /// Unix time, ms.
        at: u64,
        /// VM id.
        vm: String,
        /// Wave index (0-based).
        wave: usize,
        /// Its patches before.
        before: Vec<String>,
        /// Its kernel log's next sequence number before (the health check's
        /// baseline); none when the log cannot be read.
        log_seq: Option<u64>,
    },
    /// Done with a VM.
    Done {
        /// Unix time, ms.
        at: u64,
        /// VM id.
        vm: String,
        /// Wave index.
        wave: usize,
        /// What became of it.
        outcome: Outcome,
        /// Its patches after.
        after: Vec<String>,
        /// Time all its vCPUs were paused by the step, µs.
        paused_us: f64,
        /// The step's time, ms, health checks included.
        ms: u64,
        /// Health checks.
        health: Vec<Check>,
        /// Why it failed or was gone; notes.
        detail: String,
    },
    /// A wave ended (soak and its checks included).
    WaveDone {
        /// Unix time, ms.
        at: u64,
        /// Wave index.
        wave: usize,
        /// Every VM of it passed.
        ok: bool,
    },
    /// A VM's step was undone.
    RolledBack {
        /// Unix time, ms.
        at: u64,
        /// VM id.
        vm: String,
        /// Undone, or why not.
        ok: bool,
        /// Its patches after.
        after: Vec<String>,
        /// What happened.
        detail: String,
    },
    /// The campaign ended.
    End {
        /// Unix time, ms.
        at: u64,
        /// `done`, `failed` or `aborted`.
        outcome: String,
        /// Why, when not done.
        reason: Option<String>,
    },
}

/// The journal file, open for appending.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: File,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Journal {
    /// Reads the journal at `path` (none yet: empty). A last line cut short
    /// by a crash in mid-write is dropped (and cut off the file when it is
    /// opened for writing).
    pub fn read(path: &Path) -> Result<Vec<Entry>, String> {
        let mut data = match std::fs::read(path) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(format!("cannot read journal {}: {e}", path.display())),
        };
        // A last line without its newline was cut short by a crash, even
        // if what is there parses (`open` cuts it off the file too).
        if data.last().is_some_and(|&b| b != b'\n') {
            let keep = data.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            log::warn!(
                "journal {}: its last line is incomplete (a crash while writing it); ignored",
                path.display()
            );
            data.truncate(keep);
        }
        let mut out = Vec::new();
        let lines = BufReader::new(&data[..]).split(b'\n');
        let mut n = 0;
        for line in lines {
            n += 1;
            let line = line.map_err(|e| format!("cannot read journal {}: {e}", path.display()))?;
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match serde_json::from_slice::<Entry>(&line) {
                Ok(e) => out.push(e),
                Err(e) => {
                    return Err(format!(
                        "journal {} line {n} is damaged: {e}",
                        path.display()
                    ))
                }
            }
        }
        Ok(out)
    }

    /// Opens `path` for appending (creating it), first cutting off a torn
    /// last line.
    pub fn open(path: &Path) -> Result<Self, String> {
        let io = |e: std::io::Error| format!("cannot write journal {}: {e}", path.display());
        let mut file = File::options()
            .create(true)
            .truncate(false)
            .read(true)
            .append(true)
            .open(path)
            .map_err(io)?;
        let data = std::fs::read(path).map_err(io)?;
        if !data.is_empty() && data.last() != Some(&b'\n') {
            let keep = data.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            file.set_len(keep as u64).map_err(io)?;
            file.seek(SeekFrom::End(0)).map_err(io)?;
            file.sync_all().map_err(io)?;
        }
        // The journal's own directory entry must survive a crash too.
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        }
        Ok(Self {
            path: path.to_owned(),
            file,
        })
    }

    /// Appends `e` and syncs it to disk.
    pub fn append(&mut self, e: &Entry) -> Result<(), String> {
        let mut line = serde_json::to_vec(e).map_err(|e| e.to_string())?;
        line.push(b'\n');
        self.file
            .write_all(&line)
            .and_then(|()| self.file.sync_data())
            .map_err(|err| format!("cannot write journal {}: {err}", self.path.display()))
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_a_torn_last_line_is_dropped() {
        let dir = std::env::temp_dir().join(format!("lucos-journal-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("plan.toml.journal");
        let _ = std::fs::remove_file(&path);
        assert!(Journal::read(&path).expect("none yet").is_empty());
        let mut j = Journal::open(&path).expect("open");
        let start = Entry::Start {
            at: 1,
            digest: "d".into(),
            name: "n".into(),
            waves: vec![vec!["a".into()], vec!["b".into(), "c".into()]],
            settings: vec![],
            patches: vec!["fix".into()],
        };
        let begin = Entry::Begin {
            at: 2,
            vm: "a".into(),
            wave: 0,
            before: vec![],
            log_seq: Some(7),
        };
        j.append(&start).expect("append");
        j.append(&begin).expect("append");
        drop(j);
        // A crash in the middle of the next line (here a part that parses).
        let mut f = File::options().append(true).open(&path).expect("open");
        f.write_all(br#"{"event":"run","at":3,"pid":7}"#)
            .expect("write");
        drop(f);
        assert_eq!(
            Journal::read(&path).expect("read"),
            [start.clone(), begin.clone()]
        );
        let mut j = Journal::open(&path).expect("reopen cuts the torn line");
        let end = Entry::End {
            at: 4,
            outcome: "done".into(),
            reason: None,
        };
        j.append(&end).expect("append");
        assert_eq!(Journal::read(&path).expect("read"), [start, begin, end]);
        // Damage anywhere but at the end is an error.
        let text = std::fs::read_to_string(&path).expect("read");
        std::fs::write(&path, text.replacen("\"begin\"", "\"bgin\"", 1)).expect("write");
        assert!(Journal::read(&path)
            .expect_err("damaged")
            .contains("line 2"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
