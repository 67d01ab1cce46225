//! `kairos-agent bootentry`: list the GRUB entries and counters, pick the next boot, arm or
//! disarm boot assessment, repair a corrupt grubenv.

use std::io::Write;

use kairos_init::grubenv::{self, Counters, DEFAULT_MAX_TRIES, GrubEnv, var};

use crate::{AgentError, Ctx, Outcome, check_entry, load_env, load_env_for_update, lock, repair};

/// `kairos-agent bootentry`'s flags: at most one action, listing when none.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("action").args(["list", "select", "arm", "disarm", "repair"])))]
pub struct Args {
    /// Show the entries, which is default and next, and the counters
    #[arg(long)]
    list: bool,
    /// Boot ID once on the next boot (one-shot next_entry): cos, fallback, recovery,
    /// statereset
    #[arg(long, value_name = "ID")]
    select: Option<String>,
    /// Arm boot assessment: active and passive each get N tries before GRUB falls back
    #[arg(long)]
    arm: bool,
    /// Tries for --arm, 1..9 [default: kairos_max_tries, else 3]
    #[arg(long, value_name = "N", requires = "arm",
          value_parser = clap::value_parser!(u8).range(1..=9))]
    tries: Option<u8>,
    /// Stop counting: GRUB boots next_entry / saved_entry again
    #[arg(long)]
    disarm: bool,
    /// Rewrite a missing or corrupt grubenv as a valid empty block
    #[arg(long)]
    repair: bool,
}

impl Args {
    /// The action the flags name.
    pub fn action(self) -> Action {
        if let Some(id) = self.select {
            Action::Select(id)
        } else if self.arm {
            Action::Arm(self.tries)
        } else if self.disarm {
            Action::Disarm
        } else if self.repair {
            Action::Repair
        } else {
            Action::List
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    List,
    /// One-shot `next_entry`.
    Select(String),
    /// Arm with this many tries (None: `kairos_max_tries`, else 3).
    Arm(Option<u8>),
    Disarm,
    Repair,
}

/// What each entry boots, for the listing.
const DESCRIPTIONS: &[(&str, &str)] = &[
    ("cos", "active image"),
    ("fallback", "passive image"),
    ("recovery", "recovery image"),
    ("statereset", "recovery image, reset"),
];

pub fn bootentry(
    ctx: &Ctx,
    action: &Action,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<Outcome, AgentError> {
    match action {
        Action::List => {
            let loaded = load_env(ctx, err)?;
            list(&loaded.path.display().to_string(), &loaded.env, out)?;
        }
        Action::Select(id) => {
            let id = check_entry(id)?;
            let mut l = load_env_for_update(ctx, out, err)?;
            l.env.set(var::NEXT_ENTRY, id)?;
            grubenv::write(&l.path, &l.env)?;
            writeln!(
                out,
                "kairos-agent: next boot: {id} (one-shot next_entry in {})",
                l.path.display()
            )
            .map_err(AgentError::Output)?;
        }
        Action::Arm(tries) => {
            let mut l = load_env_for_update(ctx, out, err)?;
            let n = match tries {
                Some(n) => *n,
                None => Counters::from_env(&l.env).map_or(DEFAULT_MAX_TRIES, |c| c.max),
            };
            grubenv::arm(&mut l.env, n)?;
            grubenv::write(&l.path, &l.env)?;
            writeln!(
                out,
                "kairos-agent: boot assessment armed: cos and fallback get {n} tries each"
            )
            .map_err(AgentError::Output)?;
            if let Some(next) = l.env.get(var::NEXT_ENTRY) {
                writeln!(
                    out,
                    "kairos-agent: note: next_entry={next} is set; GRUB boots it once, uncounted, before counting"
                ).map_err(AgentError::Output)?;
            }
        }
        Action::Disarm => {
            let mut l = load_env_for_update(ctx, out, err)?;
            grubenv::disarm(&mut l.env);
            grubenv::write(&l.path, &l.env)?;
            writeln!(out, "kairos-agent: boot assessment disarmed").map_err(AgentError::Output)?;
        }
        Action::Repair => {
            let _held = lock::grubenv(ctx, &lock::this_command())?;
            let mut l = load_env(ctx, err)?;
            if l.problem.is_none() {
                writeln!(
                    out,
                    "kairos-agent: {} is a valid environment block, nothing to repair",
                    l.path.display()
                )
                .map_err(AgentError::Output)?;
            } else {
                repair(&mut l, out)?;
            }
        }
    }
    Ok(Outcome::Done)
}

fn list(path: &str, env: &GrubEnv, out: &mut dyn Write) -> Result<(), AgentError> {
    let next = grubenv::grub_choice(env);
    let default = env.get(var::SAVED_ENTRY).unwrap_or("cos");
    let max = env.get(var::MAX_TRIES).unwrap_or("3");
    writeln!(out, "grubenv: {path}").map_err(AgentError::Output)?;
    for (id, what) in DESCRIPTIONS {
        let mut flags = Vec::new();
        if *id == default {
            flags.push("default".to_string());
        }
        if *id == next.entry {
            flags.push("next".to_string());
        }
        let counter = match *id {
            "cos" => Some(var::TRIES_COS),
            "fallback" => Some(var::TRIES_FALLBACK),
            _ => None,
        };
        if let Some(c) = counter.filter(|_| env.get(var::ENABLE_BOOT_ASSESSMENT) == Some("yes")) {
            flags.push(format!("tries={}/{max}", env.get(c).unwrap_or("0")));
        }
        let line = format!("  {id:<11} {what:<22} {}", flags.join(" "));
        writeln!(out, "{}", line.trim_end()).map_err(AgentError::Output)?;
    }
    writeln!(out, "next boot: {} ({})", next.entry, next.reason).map_err(AgentError::Output)?;
    writeln!(
        out,
        "saved_entry: {}, next_entry: {}",
        env.get(var::SAVED_ENTRY).unwrap_or("-"),
        env.get(var::NEXT_ENTRY).unwrap_or("-")
    )
    .map_err(AgentError::Output)?;
    match Counters::from_env(env) {
        Ok(c) if c.armed => writeln!(
            out,
            "boot assessment: armed, max {} tries, this boot {}",
            c.max,
            if c.tentative {
                "tentative (not marked good yet)"
            } else {
                "marked good"
            }
        )
        .map_err(AgentError::Output)?,
        Ok(_) => writeln!(out, "boot assessment: not armed").map_err(AgentError::Output)?,
        Err(e) => writeln!(
            out,
            "boot assessment: invalid counter {e} (GRUB counts it as no tries left)"
        )
        .map_err(AgentError::Output)?,
    }
    if let Some(e) = env.get(var::BOOT_ENTRY) {
        writeln!(
            out,
            "last boot: {e} ({})",
            env.get(var::BOOT_REASON).unwrap_or("-")
        )
        .map_err(AgentError::Output)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    fn go(t: &Tree, a: Action) -> (Result<Outcome, AgentError>, String, String) {
        run(|o, e| bootentry(&t.ctx, &a, o, e))
    }

    #[test]
    fn list_shows_default_next_and_counters() {
        let t = Tree::new();
        t.env(&[
            ("enable_boot_assessment", "yes"),
            ("kairos_max_tries", "3"),
            ("kairos_tries_cos", "0"),
            ("kairos_tries_fallback", "2"),
            ("boot_assessment_tentative", "yes"),
            ("kairos_boot_entry", "fallback"),
            ("kairos_boot_reason", "cos-tries-exhausted"),
        ]);
        let (r, out, err) = go(&t, Action::List);
        r.unwrap();
        assert_eq!(err, "");
        let want = format!(
            "grubenv: {}\n\
             \x20 cos         active image           default tries=0/3\n\
             \x20 fallback    passive image          next tries=2/3\n\
             \x20 recovery    recovery image\n\
             \x20 statereset  recovery image, reset\n\
             next boot: fallback (cos-tries-exhausted)\n\
             saved_entry: -, next_entry: -\n\
             boot assessment: armed, max 3 tries, this boot tentative (not marked good yet)\n\
             last boot: fallback (cos-tries-exhausted)\n",
            t.ctx.grubenv_path().display()
        );
        assert_eq!(out, want);
    }

    #[test]
    fn list_of_a_corrupt_env_shows_what_grub_does() {
        let t = Tree::new();
        t.file("/oem/grubenv", b"garbage");
        let (r, out, err) = go(&t, Action::List);
        r.unwrap();
        assert!(
            err.contains("7 bytes, a GRUB environment block is exactly 1024"),
            "{err}"
        );
        assert!(out.contains("next boot: cos (default)"), "{out}");
        assert!(out.contains("boot assessment: not armed"), "{out}");
        // Listing never writes.
        assert_eq!(std::fs::read(t.ctx.grubenv_path()).unwrap(), b"garbage");
    }

    #[test]
    fn select_sets_a_one_shot_next_entry() {
        let t = Tree::new();
        t.env(&[("saved_entry", "cos"), ("extra_cmdline", "quiet")]);
        let (r, out, _) = go(&t, Action::Select("fallback".into()));
        r.unwrap();
        assert_eq!(
            out,
            format!(
                "kairos-agent: next boot: fallback (one-shot next_entry in {})\n",
                t.ctx.grubenv_path().display()
            )
        );
        let e = t.read_env();
        assert_eq!(e.get("next_entry"), Some("fallback"));
        assert_eq!(e.get("extra_cmdline"), Some("quiet"));
        let (_, out, _) = go(&t, Action::List);
        assert!(
            out.contains("  fallback    passive image          next\n"),
            "{out}"
        );
        assert!(out.contains("next boot: fallback (next_entry)"), "{out}");
    }

    #[test]
    fn select_refuses_unknown_ids_and_changes_nothing() {
        let t = Tree::new();
        let before = t.env(&[("saved_entry", "cos")]);
        let (r, out, _) = go(&t, Action::Select("Cos".into()));
        let e = r.unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown boot entry \"Cos\": expected one of cos, fallback, recovery, statereset"
        );
        assert_eq!(out, "");
        assert_eq!(t.read_env(), before);
    }

    #[test]
    fn select_on_a_corrupt_env_repairs_it_first() {
        let t = Tree::new();
        t.file("/oem/grubenv", vec![0u8; 1024]);
        let (r, out, err) = go(&t, Action::Select("recovery".into()));
        r.unwrap();
        assert!(
            err.contains("no \"# GRUB Environment Block\" header"),
            "{err}"
        );
        let lines: Vec<_> = out.lines().collect();
        assert!(lines[0].starts_with("kairos-agent: rewrote "), "{out}");
        assert!(
            lines[1].starts_with("kairos-agent: next boot: recovery"),
            "{out}"
        );
        let e = t.read_env();
        assert_eq!(e.iter().collect::<Vec<_>>(), [("next_entry", "recovery")]);
    }

    #[test]
    fn arm_and_disarm() {
        let t = Tree::new();
        t.env(&[
            ("kairos_max_tries", "5"),
            ("boot_assessment_tentative", "yes"),
        ]);
        let (r, out, _) = go(&t, Action::Arm(None));
        r.unwrap();
        assert_eq!(
            out,
            "kairos-agent: boot assessment armed: cos and fallback get 5 tries each\n"
        );
        let c = Counters::from_env(&t.read_env()).unwrap();
        assert_eq!(
            (c.armed, c.tries_cos, c.tries_fallback, c.max, c.tentative),
            (true, 5, 5, 5, false)
        );
        let (r, _, _) = go(&t, Action::Arm(Some(2)));
        r.unwrap();
        let c = Counters::from_env(&t.read_env()).unwrap();
        assert_eq!((c.tries_cos, c.tries_fallback, c.max), (2, 2, 2));
        let (r, _, _) = go(&t, Action::Arm(Some(0)));
        assert!(matches!(r, Err(AgentError::Counter(_))));
        let (r, out, _) = go(&t, Action::Disarm);
        r.unwrap();
        assert_eq!(out, "kairos-agent: boot assessment disarmed\n");
        let e = t.read_env();
        assert_eq!(e.iter().collect::<Vec<_>>(), [("kairos_max_tries", "2")]);
    }

    #[test]
    fn arm_defaults_to_three_and_notes_a_pending_next_entry() {
        let t = Tree::new();
        t.env(&[("next_entry", "fallback"), ("kairos_max_tries", "junk")]);
        let (r, out, _) = go(&t, Action::Arm(None));
        r.unwrap();
        assert!(out.contains("get 3 tries each"), "{out}");
        assert!(out.contains("next_entry=fallback is set"), "{out}");
    }

    #[test]
    fn repair_only_when_needed() {
        let t = Tree::new();
        t.env(&[("saved_entry", "fallback")]);
        let (r, out, err) = go(&t, Action::Repair);
        r.unwrap();
        assert!(
            out.ends_with("is a valid environment block, nothing to repair\n"),
            "{out}"
        );
        assert_eq!(err, "");
        assert_eq!(t.read_env().get("saved_entry"), Some("fallback"));
        let mut block = t.read_env().to_block(&t.ctx.grubenv_path()).unwrap();
        block[1023] = b'x';
        t.file("/oem/grubenv", block);
        let (r, out, err) = go(&t, Action::Repair);
        r.unwrap();
        assert!(err.contains("inside the # padding"), "{err}");
        assert!(out.starts_with("kairos-agent: rewrote "), "{out}");
        assert!(t.read_env().is_empty());
        // Nothing else in the tree was written.
        let mut names: Vec<_> = std::fs::read_dir(t.ctx.path("/oem"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["grubenv"]);
    }

    #[test]
    fn unreadable_for_other_reasons_is_an_error_not_a_rewrite() {
        let t = Tree::new();
        // A directory where the file should be: EISDIR is no corruption to paper over.
        std::fs::create_dir_all(t.ctx.grubenv_path()).unwrap();
        let (r, _, _) = go(&t, Action::Disarm);
        assert!(matches!(r, Err(AgentError::GrubEnv(_))), "{r:?}");
        assert!(t.ctx.grubenv_path().is_dir());
    }
}
