//! A campaign's plan: the TOML file an operator writes (docs/campaigns.md),
//! read and checked in full before any VM is touched. Every error names the
//! plan's line.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use toml::Spanned;

/// What a campaign does with a patch on every VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// `lucos patch`: apply it (nothing if it is applied already).
    #[default]
    Apply,
    /// `lucos revert`: revert it (nothing if it is not applied).
    Revert,
    /// `lucos patch --replace`: it replaces every applied patch.
    Replace,
}

/// What a campaign does when a VM fails (a patch refused, a health check).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum OnFailure {
    /// Stop; leave every VM as it is.
    Stop,
    /// Stop, and undo the failed wave on its VMs.
    #[default]
    RollbackWave,
    /// Stop, and undo the campaign on every VM it changed.
    RollbackAll,
}

/// A patch of the plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanPatch {
    /// The `.lup`.
    pub file: PathBuf,
    /// Its name (from its manifest, or the plan's `name` for a revert of a
    /// patch whose file is not at hand).
    pub name: String,
    /// What to do with it.
    pub action: Action,
}

/// How many VMs a wave takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WaveSize {
    /// This many.
    Count(usize),
    /// This percentage of all the campaign's VMs, rounded up.
    Percent(u32),
    /// All that are left.
    Rest,
}

/// A wave.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wave {
    /// How many VMs.
    pub size: WaveSize,
    /// VMs patched at once.
    pub concurrency: usize,
    /// How long to wait after the wave before checking its VMs again.
    pub soak: Duration,
    /// The wave's time limit: a patch refused as busy is tried again until it.
    pub timeout: Duration,
}

/// The health checks, run on each VM after its step and again after the soak.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// The guest kernel's clock advances.
    pub alive: bool,
    /// No new oops, BUG, WARNING, lockup, stall or panic in its log.
    pub log: bool,
    /// The patches are in effect and the switched sites hold what they should.
    pub patch: bool,
    /// A command run on the host (`sh -c`), with `LUCOS_VM` set; exit 0 passes.
    pub command: Option<String>,
    /// How long `alive` waits and `command` may run.
    pub timeout: Duration,
}

/// Which VMs the campaign is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Targets {
    /// Ids and globs, with their lines.
    pub vms: Vec<(String, usize)>,
    /// Labels every target must carry (`lucos run --label k=v`).
    pub labels: BTreeMap<String, String>,
    /// The line of `[targets]`.
    pub line: usize,
}

/// A checked plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// The plan file.
    pub path: PathBuf,
    /// Its name (`name`, else the file's stem).
    pub name: String,
    /// The patches, in order.
    pub patches: Vec<PlanPatch>,
    /// The targets.
    pub targets: Targets,
    /// The waves (at least one).
    pub waves: Vec<Wave>,
    /// The health checks.
    pub health: Health,
    /// What a failure makes the campaign do.
    pub on_failure: OnFailure,
    /// SHA-256 of the plan's text: a journal belongs to one plan.
    pub digest: String,
}

/// A plan that cannot be run, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{}: {message}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct PlanError {
    /// The plan.
    pub path: PathBuf,
    /// Its line, where one is to blame.
    pub line: Option<usize>,
    /// What is wrong.
    pub message: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlan {
    name: Option<String>,
    #[serde(rename = "patch", default)]
    patches: Vec<Spanned<RawPatch>>,
    targets: Option<Spanned<RawTargets>>,
    #[serde(rename = "wave", default)]
    waves: Vec<Spanned<RawWave>>,
    #[serde(default)]
    health: Option<RawHealth>,
    #[serde(default)]
    failure: Option<RawFailure>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPatch {
    file: Spanned<String>,
    #[serde(default)]
    action: Action,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTargets {
    #[serde(default)]
    vms: Vec<Spanned<String>>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawSize {
    Count(i64),
    Text(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWave {
    size: Spanned<RawSize>,
    concurrency: Option<Spanned<i64>>,
    soak: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    #[serde(default = "yes")]
    alive: bool,
    #[serde(default = "yes")]
    log: bool,
    #[serde(default = "yes")]
    patch: bool,
    command: Option<String>,
    timeout: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFailure {
    action: OnFailure,
}

fn yes() -> bool {
    true
}

/// Default time limit of a wave.
pub const WAVE_TIMEOUT: Duration = Duration::from_secs(300);
/// Default time a health check may take.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(30);

/// The 1-based line of byte `at` in `text`.
fn line_of(text: &str, at: usize) -> usize {
    text.as_bytes()[..at.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

impl Plan {
    /// Reads and checks the plan at `path`. `patch_name` reads a `.lup`'s
    /// name (and so checks that it is one).
    pub fn load(
        path: &Path,
        patch_name: &dyn Fn(&Path) -> Result<String, String>,
    ) -> Result<Self, PlanError> {
        let text = std::fs::read_to_string(path).map_err(|e| PlanError {
            path: path.to_owned(),
            line: None,
            message: format!("cannot read the plan: {e}"),
        })?;
        Self::parse(path, &text, patch_name)
    }

    /// Checks the plan `text` read from `path`.
    pub fn parse(
        path: &Path,
        text: &str,
        patch_name: &dyn Fn(&Path) -> Result<String, String>,
    ) -> Result<Self, PlanError> {
        let err = |span: Option<Range<usize>>, message: String| PlanError {
            path: path.to_owned(),
            line: span.map(|s| line_of(text, s.start)),
            message,
        };
        let raw: RawPlan = toml::from_str(text).map_err(|e| {
            err(
                e.span(),
                e.message().trim().replace('\n', " ").replace("  ", " "),
            )
        })?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let name = match raw.name {
            Some(n) if n.trim().is_empty() => return Err(err(None, "`name` is empty".into())),
            Some(n) => n,
            None => path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "campaign".into()),
        };
        if raw.patches.is_empty() {
            return Err(err(
                None,
                "no [[patch]]: a campaign needs a patch to apply, revert or replace".into(),
            ));
        }
        let mut patches = Vec::new();
        for p in &raw.patches {
            let file_span = p.get_ref().file.span();
            let rel = p.get_ref().file.get_ref();
            let file = dir.join(rel);
            let name = patch_name(&file)
                .map_err(|why| err(Some(file_span.clone()), format!("patch {rel}: {why}")))?;
            let action = p.get_ref().action;
            if patches.iter().any(|q: &PlanPatch| q.name == name) {
                return Err(err(
                    Some(p.span()),
                    format!("patch {name} is in the plan twice"),
                ));
            }
            patches.push(PlanPatch { file, name, action });
        }
        if patches.len() > 1 && patches.iter().any(|p| p.action == Action::Replace) {
            return Err(err(
                Some(raw.patches[0].span()),
                "action replace replaces every applied patch: it must be the plan's only patch"
                    .into(),
            ));
        }
        let Some(t) = raw.targets else {
            return Err(err(
                None,
                "no [targets]: name the VMs (ids or globs) or labels".into(),
            ));
        };
        let targets = Targets {
            vms: t
                .get_ref()
                .vms
                .iter()
                .map(|v| (v.get_ref().clone(), line_of(text, v.span().start)))
                .collect(),
            labels: t.get_ref().labels.clone(),
            line: line_of(text, t.span().start),
        };
        if targets.vms.is_empty() && targets.labels.is_empty() {
            return Err(err(
                Some(t.span()),
                "[targets] names no VMs and no labels (to mean every VM, say vms = [\"*\"])".into(),
            ));
        }
        for (v, line) in &targets.vms {
            if let Err(e) = globset::Glob::new(v) {
                return Err(PlanError {
                    path: path.to_owned(),
                    line: Some(*line),
                    message: format!("target '{v}' is not a valid glob: {e}"),
                });
            }
        }
        let mut waves = Vec::new();
        let n = raw.waves.len();
        for (i, w) in raw.waves.iter().enumerate() {
            let w_ref = w.get_ref();
            let at = |s: Range<usize>| Some(s);
            let which = format!("wave {}", i + 1);
            let size = match w_ref.size.get_ref() {
                RawSize::Count(c) if *c <= 0 => {
                    return Err(err(
                        at(w_ref.size.span()),
                        format!("{which}: size {c}: a wave needs at least one VM"),
                    ))
                }
                RawSize::Count(c) => WaveSize::Count(*c as usize),
                RawSize::Text(s) if s == "rest" => {
                    if i + 1 != n {
                        return Err(err(
                            at(w_ref.size.span()),
                            format!("{which}: size \"rest\" must be the last wave's"),
                        ));
                    }
                    WaveSize::Rest
                }
                RawSize::Text(s) => match s.strip_suffix('%').map(|p| p.trim().parse::<u32>()) {
                    Some(Ok(p)) if (1..=100).contains(&p) => WaveSize::Percent(p),
                    _ => {
                        return Err(err(
                            at(w_ref.size.span()),
                            format!(
                                "{which}: size \"{s}\": give a count, a percentage from 1% to 100%, or \"rest\""
                            ),
                        ))
                    }
                },
            };
            let concurrency = match &w_ref.concurrency {
                None => 1,
                Some(c) if *c.get_ref() <= 0 || *c.get_ref() > 256 => {
                    return Err(err(
                        at(c.span()),
                        format!("{which}: concurrency {} is not in 1..=256", c.get_ref()),
                    ))
                }
                Some(c) => *c.get_ref() as usize,
            };
            let duration = |d: &Option<Spanned<String>>, what: &str, default: Duration| match d {
                None => Ok(default),
                Some(d) => humantime::parse_duration(d.get_ref()).map_err(|e| {
                    err(
                        at(d.span()),
                        format!(
                            "{which}: {what} \"{}\": {e} (say e.g. \"30s\", \"5m\")",
                            d.get_ref()
                        ),
                    )
                }),
            };
            let timeout = duration(&w_ref.timeout, "timeout", WAVE_TIMEOUT)?;
            if timeout.is_zero() {
                return Err(err(
                    w_ref.timeout.as_ref().map(|t| t.span()),
                    format!("{which}: timeout 0: a wave needs time to patch"),
                ));
            }
            waves.push(Wave {
                size,
                concurrency,
                soak: duration(&w_ref.soak, "soak", Duration::ZERO)?,
                timeout,
            });
        }
        if waves.is_empty() {
            waves.push(Wave {
                size: WaveSize::Rest,
                concurrency: 1,
                soak: Duration::ZERO,
                timeout: WAVE_TIMEOUT,
            });
        }
        let health = match raw.health {
            None => Health {
                alive: true,
                log: true,
                patch: true,
                command: None,
                timeout: HEALTH_TIMEOUT,
            },
            Some(h) => Health {
                alive: h.alive,
                log: h.log,
                patch: h.patch,
                command: h.command.filter(|c| !c.trim().is_empty()),
                timeout: match &h.timeout {
                    None => HEALTH_TIMEOUT,
                    Some(d) => match humantime::parse_duration(d.get_ref()) {
                        Ok(t) if t.is_zero() => {
                            return Err(err(
                                Some(d.span()),
                                "health: timeout 0: the checks need time to run".into(),
                            ))
                        }
                        Ok(t) => t,
                        Err(e) => {
                            return Err(err(
                                Some(d.span()),
                                format!("health: timeout \"{}\": {e}", d.get_ref()),
                            ))
                        }
                    },
                },
            },
        };
        let on_failure = raw.failure.map(|f| f.action).unwrap_or_default();
        if on_failure != OnFailure::Stop && patches.iter().any(|p| p.action == Action::Replace) {
            return Err(err(
                None,
                "action replace cannot be rolled back (the patches it replaces are not in the plan): say [failure] action = \"stop\"".into(),
            ));
        }
        use sha2::Digest;
        let digest = format!("{:x}", sha2::Sha256::digest(text.as_bytes()));
        Ok(Plan {
            path: path.to_owned(),
            name,
            patches,
            targets,
            waves,
            health,
            on_failure,
            digest,
        })
    }

    /// The plan's VMs among `running` (id, labels), sorted by id: every id
    /// and glob must match one, every label must be carried.
    pub fn resolve(&self, running: &[(String, super::Labels)]) -> Result<Vec<String>, PlanError> {
        let err = |line: usize, message: String| PlanError {
            path: self.path.clone(),
            line: Some(line),
            message,
        };
        let labelled = |labels: &BTreeMap<String, String>| {
            self.targets
                .labels
                .iter()
                .all(|(k, v)| labels.get(k) == Some(v))
        };
        let mut out: Vec<String> = Vec::new();
        if self.targets.vms.is_empty() {
            out = running
                .iter()
                .filter(|(_, l)| labelled(l))
                .map(|(id, _)| id.clone())
                .collect();
        }
        for (pattern, line) in &self.targets.vms {
            let glob = globset::Glob::new(pattern)
                .map_err(|e| err(*line, format!("target '{pattern}': {e}")))?
                .compile_matcher();
            let matched: Vec<&(String, super::Labels)> =
                running.iter().filter(|(id, _)| glob.is_match(id)).collect();
            if matched.is_empty() {
                return Err(err(
                    *line,
                    format!("target '{pattern}' matches no running VM"),
                ));
            }
            out.extend(
                matched
                    .into_iter()
                    .filter(|(_, l)| labelled(l))
                    .map(|(id, _)| id.clone()),
            );
        }
        out.sort();
        out.dedup();
        if out.is_empty() {
            return Err(err(
                self.targets.line,
                format!(
                    "the targets match no running VM{}",
                    if self.targets.labels.is_empty() {
                        String::new()
                    } else {
                        format!(" with labels {:?}", self.targets.labels)
                    }
                ),
            ));
        }
        Ok(out)
    }

    /// `vms` split into the plan's waves, in order; a wave left empty is
    /// dropped, and VMs left after the last wave make one more wave with
    /// the last one's settings.
    pub fn split(&self, vms: &[String]) -> Vec<(Wave, Vec<String>)> {
        let total = vms.len();
        let mut rest = vms;
        let mut out = Vec::new();
        for w in &self.waves {
            let n = match w.size {
                WaveSize::Count(c) => c,
                WaveSize::Percent(p) => (total * p as usize).div_ceil(100).max(1),
                WaveSize::Rest => rest.len(),
            }
            .min(rest.len());
            if n == 0 {
                continue;
            }
            out.push((w.clone(), rest[..n].to_vec()));
            rest = &rest[n..];
        }
        if !rest.is_empty() {
            let last = self.waves.last().cloned().unwrap_or(Wave {
                size: WaveSize::Rest,
                concurrency: 1,
                soak: Duration::ZERO,
                timeout: WAVE_TIMEOUT,
            });
            out.push((last, rest.to_vec()));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(p: &Path) -> Result<String, String> {
        match p.file_stem().and_then(|s| s.to_str()) {
            Some("missing") => Err("No such file or directory".into()),
            Some(s) => Ok(s.to_owned()),
            None => Err("no name".into()),
        }
    }

    fn parse(text: &str) -> Result<Plan, PlanError> {
        Plan::parse(Path::new("/p/plan.toml"), text, &name)
    }

    const GOOD: &str = r#"
name = "cve"
[[patch]]
file = "fix.lup"
[targets]
vms = ["web*", "db1"]
[[wave]]
size = 1
[[wave]]
size = "25%"
concurrency = 4
soak = "2s"
[[wave]]
size = "rest"
concurrency = 8
timeout = "1m"
[health]
command = "true"
[failure]
action = "rollback-all"
"#;

    #[test]
    fn a_full_plan_is_read() {
        let p = parse(GOOD).expect("good plan");
        assert_eq!(p.name, "cve");
        assert_eq!(p.patches[0].file, Path::new("/p/fix.lup"));
        assert_eq!(p.patches[0].name, "fix");
        assert_eq!(p.patches[0].action, Action::Apply);
        assert_eq!(p.waves.len(), 3);
        assert_eq!(p.waves[1].size, WaveSize::Percent(25));
        assert_eq!(p.waves[1].soak, Duration::from_secs(2));
        assert_eq!(p.waves[2].timeout, Duration::from_secs(60));
        assert_eq!(p.on_failure, OnFailure::RollbackAll);
        assert!(p.health.alive && p.health.log && p.health.patch);
        assert_eq!(p.targets.vms[1], ("db1".to_owned(), 6));
    }

    #[test]
    fn waves_split_one_then_a_quarter_then_the_rest() {
        let p = parse(GOOD).expect("good plan");
        let vms: Vec<String> = (0..21).map(|i| format!("vm{i:02}")).collect();
        let w = p.split(&vms);
        let sizes: Vec<usize> = w.iter().map(|(_, v)| v.len()).collect();
        assert_eq!(sizes, [1, 6, 14]);
        let all: Vec<String> = w.into_iter().flat_map(|(_, v)| v).collect();
        assert_eq!(all, vms, "every VM once, in order");
        // Fewer VMs than waves: empty waves are dropped.
        assert_eq!(p.split(&vms[..1]).len(), 1);
        // VMs beyond the last wave make one more.
        let two = parse(&GOOD.replace("size = \"rest\"", "size = 2")).expect("plan");
        let sizes: Vec<usize> = two.split(&vms).iter().map(|(_, v)| v.len()).collect();
        assert_eq!(sizes, [1, 6, 2, 12]);
    }

    fn error(text: &str) -> PlanError {
        parse(text).expect_err("a bad plan")
    }

    #[test]
    fn bad_plans_are_refused_naming_the_line() {
        let e = error(&GOOD.replace("concurrency = 4", "concurrency = 4\nsoakk = 1"));
        assert_eq!(e.line, Some(12), "{e}");
        assert!(e.message.contains("soakk"), "{e}");
        let e = error(&GOOD.replace("size = 1", "size = 0"));
        assert_eq!(e.line, Some(8), "{e}");
        assert!(e.message.contains("at least one VM"), "{e}");
        let e = error(&GOOD.replace("\"25%\"", "\"250%\""));
        assert!(e.message.contains("250%"), "{e}");
        let e = error(&GOOD.replace("fix.lup", "missing.lup"));
        assert_eq!(e.line, Some(4), "{e}");
        assert!(e.message.contains("missing.lup"), "{e}");
        let e = error(&GOOD.replace("soak = \"2s\"", "soak = \"two\""));
        assert!(e.message.contains("soak"), "{e}");
        let e = error(&GOOD.replace("size = 1", "size = \"rest\""));
        assert!(e.message.contains("last"), "{e}");
        let e = error(&GOOD.replace("vms = [\"web*\", \"db1\"]", ""));
        assert!(e.message.contains("names no VMs"), "{e}");
        let e = error(&GOOD.replace("rollback-all", "retry"));
        assert!(e.message.contains("retry"), "{e}");
        assert!(e.to_string().starts_with("/p/plan.toml:"), "{e}");
        let e = error(&GOOD.replace(
            "file = \"fix.lup\"",
            "file = \"fix.lup\"\naction = \"replace\"",
        ));
        assert!(e.message.contains("stop"), "{e}");
    }

    #[test]
    fn targets_resolve_over_running_vms_and_labels() {
        let p = parse(GOOD).expect("plan");
        let vm = |id: &str, tier: &str| {
            (
                id.to_owned(),
                BTreeMap::from([("tier".to_owned(), tier.to_owned())]),
            )
        };
        let running = vec![
            vm("web2", "a"),
            vm("db1", "b"),
            vm("web1", "a"),
            vm("x", "a"),
        ];
        assert_eq!(
            p.resolve(&running).expect("targets"),
            ["db1", "web1", "web2"]
        );
        let e = p.resolve(&running[..1]).expect_err("db1 is not running");
        assert_eq!(e.line, Some(6));
        assert!(e.message.contains("'db1' matches no running VM"), "{e}");
        let by_label =
            parse(&GOOD.replace("vms = [\"web*\", \"db1\"]", "labels = { tier = \"a\" }"))
                .expect("plan");
        assert_eq!(
            by_label.resolve(&running).expect("targets"),
            ["web1", "web2", "x"]
        );
        let none = parse(&GOOD.replace("vms = [\"web*\", \"db1\"]", "labels = { tier = \"c\" }"))
            .expect("plan");
        assert!(none
            .resolve(&running)
            .expect_err("no VM")
            .message
            .contains("match no running VM"));
    }
}
