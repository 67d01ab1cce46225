//! `kairos-agent mark-good`: the boot assessment. Resets the booted entry's counter only after
//! the health checks pass; a refused boot keeps counting down towards the fallback.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::builder::TypedValueParser as _;

use kairos_init::grubenv::{self, Counters, MarkedGood, var};

use crate::{AgentError, Ctx, Outcome, check_entry, entry_for_mode, load_env_for_update};

/// Written by the `boot` stage (`kairos-agent run-stage boot`) when no step failed.
pub const BOOT_STAGE_OK: &str = "/run/kairos/boot-stage-ok";
/// Its presence means K3s is configured on this node.
pub const K3S_CONFIG: &str = "/etc/rancher/k3s/config.yaml";
pub const K3S_BINARIES: &[&str] = &["/usr/bin/k3s", "/usr/local/bin/k3s"];
pub const DEFAULT_K3S_TIMEOUT: Duration = Duration::from_secs(30);

/// `kairos-agent mark-good`'s options (the command line's flags).
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct Options {
    /// Entry that booted (cos, fallback, recovery, statereset) [default: from
    /// rd.kairos.boot_reason, else kairos_boot_entry, checked against /run/cos]
    #[arg(long, value_name = "ENTRY")]
    pub booted: Option<String>,
    /// Require K3s to be ready even without /etc/rancher/k3s/config.yaml
    #[arg(long)]
    pub k3s: bool,
    /// How long `k3s kubectl get --raw /readyz` may take
    #[arg(long, value_name = "SECS", default_value = "30",
          value_parser = clap::value_parser!(u64).map(Duration::from_secs))]
    pub k3s_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            booted: None,
            k3s: false,
            k3s_timeout: DEFAULT_K3S_TIMEOUT,
        }
    }
}

pub fn mark_good(
    ctx: &Ctx,
    opts: &Options,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<Outcome, AgentError> {
    let explicit = opts.booted.as_deref().map(check_entry).transpose()?;
    let entry = match explicit {
        Some(e) => e.to_owned(),
        None => {
            // Dropped (the lock with it) before the checks: the K3s wait is long.
            let l = load_env_for_update(ctx, out, err)?;
            match booted_entry(ctx, &l.env, out)? {
                Ok(e) => e,
                Err(why) => return refuse(out, &why),
            }
        }
    };
    if !ctx.path(BOOT_STAGE_OK).exists() {
        return refuse(
            out,
            &format!("boot stage has not succeeded (no {BOOT_STAGE_OK})"),
        );
    }
    if (opts.k3s || ctx.path(K3S_CONFIG).exists())
        && let Err(why) = k3s_ready(ctx, opts.k3s_timeout)
    {
        return refuse(out, &why);
    }
    // Read again, under the lock, after the checks: the K3s wait is long enough for
    // `bootentry --select` or an upgrade to change the block, and their change must stay.
    let mut l = load_env_for_update(ctx, out, err)?;
    if let Err(e) = Counters::from_env(&l.env) {
        writeln!(err, "kairos-agent: warning: {}: {e}", l.path.display())
            .map_err(AgentError::Output)?;
    }
    let done = grubenv::mark_good(&mut l.env, &entry);
    grubenv::write(&l.path, &l.env)?;
    let what = match done {
        MarkedGood::TriesReset { max, .. } => format!("tries reset to {max}"),
        MarkedGood::NotArmed => "boot assessment not armed".into(),
        MarkedGood::NoCounter => "no counter for this entry".into(),
    };
    writeln!(
        out,
        "kairos-agent: boot marked good (entry={entry}, {what})"
    )
    .map_err(AgentError::Output)?;
    Ok(Outcome::Done)
}

fn refuse(out: &mut dyn Write, why: &str) -> Result<Outcome, AgentError> {
    writeln!(out, "kairos-agent: not marking good: {why}").map_err(AgentError::Output)?;
    Ok(Outcome::Refused)
}

/// The entry GRUB booted (kernel command line, else what GRUB saved), checked against the
/// image kairos-init actually started: when the init fell back (active.img missing, say) the
/// running system is the fallback's, and marking GRUB's entry good would hide the failure.
fn booted_entry(
    ctx: &Ctx,
    env: &grubenv::GrubEnv,
    out: &mut dyn Write,
) -> Result<Result<String, String>, AgentError> {
    let reason = ctx.boot_reason();
    let from_grub = reason
        .as_deref()
        .map(|r| r.split_once(':').map_or(r, |(e, _)| e))
        .filter(|e| !e.is_empty())
        .or(env.get(var::BOOT_ENTRY));
    let mode = ctx.mode();
    let from_mode = mode.and_then(entry_for_mode);
    Ok(match (from_grub, from_mode) {
        (Some(g), Some(m)) if g != m => {
            writeln!(
                out,
                "kairos-agent: note: GRUB booted {g} but kairos-init started the {} image; marking {m}",
                mode.unwrap_or("?")
            ).map_err(AgentError::Output)?;
            Ok(m.to_owned())
        }
        (Some(g), _) => Ok(g.to_owned()),
        (None, Some(m)) => Ok(m.to_owned()),
        (None, None) => Err(
            "cannot tell which entry booted (no rd.kairos.boot_reason, no kairos_boot_entry, \
             no /run/cos mode); use --booted ENTRY"
                .into(),
        ),
    })
}

/// `k3s kubectl get --raw /readyz` must answer `ok` within `timeout`.
fn k3s_ready(ctx: &Ctx, timeout: Duration) -> Result<(), String> {
    let Some(bin) = K3S_BINARIES
        .iter()
        .map(|b| ctx.path(b))
        .find(|p| p.is_file())
    else {
        return Err(format!(
            "k3s is enabled but not installed (no {})",
            K3S_BINARIES.join(" or ")
        ));
    };
    let mut cmd = Command::new(&bin);
    cmd.args(["kubectl", "get", "--raw", "/readyz"]);
    let (status, stdout, stderr) = run_bounded(&mut cmd, &bin, timeout)?;
    if status.success() && stdout.trim() == "ok" {
        return Ok(());
    }
    let said = [stdout.trim(), stderr.trim()]
        .into_iter()
        .find(|s| !s.is_empty())
        .and_then(|s| s.lines().next())
        .unwrap_or("nothing");
    Err(format!(
        "k3s is not ready: /readyz said {said:?} ({status})"
    ))
}

/// Output kept from the child; /readyz says "ok" or a short verbose report.
const MAX_OUTPUT: u64 = 64 * 1024;

/// Run `cmd`, killing it after `timeout`. Output is read on threads so a chatty child cannot
/// block on a full pipe, and the wait never depends on the pipes closing (a grandchild may
/// keep them open).
fn run_bounded(
    cmd: &mut Command,
    bin: &Path,
    timeout: Duration,
) -> Result<(ExitStatus, String, String), String> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child =
        crate::spawn_retrying(cmd).map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
    let (tx, rx) = mpsc::channel();
    let pipes: [(usize, Option<Box<dyn Read + Send>>); 2] = [
        (0, child.stdout.take().map(|p| Box::new(p) as _)),
        (1, child.stderr.take().map(|p| Box::new(p) as _)),
    ];
    for (i, pipe) in pipes {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(p) = pipe {
                let _ = p.take(MAX_OUTPUT).read_to_end(&mut buf);
            }
            let _ = tx.send((i, String::from_utf8_lossy(&buf).into_owned()));
        });
    }
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "k3s is not ready: {} gave no answer within {} s",
                    bin.display(),
                    timeout.as_secs_f64()
                ));
            }
            Err(e) => return Err(format!("waiting for {}: {e}", bin.display())),
        }
    };
    let mut outs = [String::new(), String::new()];
    for _ in 0..2 {
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok((i, s)) => {
                if let Some(slot) = outs.get_mut(i) {
                    *slot = s;
                }
            }
            Err(_) => break,
        }
    }
    let [stdout, stderr] = outs;
    Ok((status, stdout, stderr))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;
    use std::os::unix::fs::PermissionsExt;

    fn go(t: &Tree, opts: Options) -> (Outcome, String, String) {
        let (r, out, err) = run(|o, e| mark_good(&t.ctx, &opts, o, e));
        (r.unwrap(), out, err)
    }

    /// An armed env after GRUB's first counted try of `entry`.
    fn tried(t: &Tree, entry: &str) {
        t.cmdline(&format!(
            "root=LABEL=COS_ACTIVE rd.kairos.boot_reason={entry}:counted-try"
        ));
        let mut e = t.env(&[]);
        grubenv::arm(&mut e, 3).unwrap();
        grubenv::grub_boot(&mut e);
        grubenv::write(&t.ctx.grubenv_path(), &e).unwrap();
    }

    fn k3s(t: &Tree, script: &str) {
        let p = t.ctx.path("/usr/local/bin/k3s");
        t.file("/usr/local/bin/k3s", format!("#!/bin/sh\n{script}\n"));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn good_boot_resets_the_counter() {
        let t = Tree::new();
        tried(&t, "cos");
        t.file("/run/cos/active_mode", "");
        t.file(BOOT_STAGE_OK, "");
        assert_eq!(Counters::from_env(&t.read_env()).unwrap().tries_cos, 2);
        let (r, out, err) = go(&t, Options::default());
        assert_eq!(r, Outcome::Done);
        assert_eq!(
            out,
            "kairos-agent: boot marked good (entry=cos, tries reset to 3)\n"
        );
        assert_eq!(err, "");
        let c = Counters::from_env(&t.read_env()).unwrap();
        assert_eq!((c.tries_cos, c.tentative), (3, false));
    }

    #[test]
    fn refused_without_the_boot_stage_marker() {
        let t = Tree::new();
        tried(&t, "cos");
        let before = t.read_env();
        let (r, out, _) = go(&t, Options::default());
        assert_eq!(r, Outcome::Refused);
        assert_eq!(
            out,
            "kairos-agent: not marking good: boot stage has not succeeded (no /run/kairos/boot-stage-ok)\n"
        );
        assert_eq!(t.read_env(), before);
    }

    #[test]
    fn passive_marked_good_leaves_active_exhausted() {
        let t = Tree::new();
        t.cmdline("root=LABEL=COS_PASSIVE rd.kairos.boot_reason=fallback:cos-tries-exhausted");
        let mut e = t.env(&[]);
        grubenv::arm(&mut e, 3).unwrap();
        for _ in 0..4 {
            grubenv::grub_boot(&mut e);
        }
        grubenv::write(&t.ctx.grubenv_path(), &e).unwrap();
        t.file("/run/cos/passive_mode", "");
        t.file(BOOT_STAGE_OK, "");
        let (r, out, _) = go(&t, Options::default());
        assert_eq!(r, Outcome::Done);
        assert_eq!(
            out,
            "kairos-agent: boot marked good (entry=fallback, tries reset to 3)\n"
        );
        let c = Counters::from_env(&t.read_env()).unwrap();
        assert_eq!((c.tries_cos, c.tries_fallback, c.tentative), (0, 3, false));
    }

    #[test]
    fn the_running_image_wins_over_grubs_entry() {
        // GRUB tried cos, but kairos-init fell back to passive within the boot.
        let t = Tree::new();
        tried(&t, "cos");
        t.file("/run/cos/passive_mode", "");
        t.file(BOOT_STAGE_OK, "");
        let (r, out, _) = go(&t, Options::default());
        assert_eq!(r, Outcome::Done);
        assert_eq!(
            out,
            "kairos-agent: note: GRUB booted cos but kairos-init started the passive image; marking fallback\n\
             kairos-agent: boot marked good (entry=fallback, tries reset to 3)\n"
        );
        let c = Counters::from_env(&t.read_env()).unwrap();
        assert_eq!((c.tries_cos, c.tries_fallback), (2, 3));
    }

    #[test]
    fn entry_from_the_grubenv_or_the_flag() {
        let t = Tree::new();
        tried(&t, "cos");
        t.cmdline("root=LABEL=COS_ACTIVE");
        t.file(BOOT_STAGE_OK, "");
        // kairos_boot_entry=cos from GRUB's save.
        let (r, out, _) = go(&t, Options::default());
        assert_eq!(r, Outcome::Done);
        assert!(out.contains("entry=cos, tries reset to 3"), "{out}");
        let opts = Options {
            booted: Some("recovery".into()),
            ..Options::default()
        };
        let (r, out, _) = go(&t, opts);
        assert_eq!(r, Outcome::Done);
        assert_eq!(
            out,
            "kairos-agent: boot marked good (entry=recovery, no counter for this entry)\n"
        );
        let opts = Options {
            booted: Some("nope".into()),
            ..Options::default()
        };
        let (r, _, _) = run(|o, e| mark_good(&t.ctx, &opts, o, e));
        assert!(matches!(r, Err(AgentError::UnknownEntry(_))));
    }

    #[test]
    fn no_clue_which_entry_booted_is_a_refusal() {
        let t = Tree::new();
        t.env(&[]);
        t.file(BOOT_STAGE_OK, "");
        let (r, out, _) = go(&t, Options::default());
        assert_eq!(r, Outcome::Refused);
        assert!(out.starts_with("kairos-agent: not marking good: cannot tell which entry booted"));
    }

    #[test]
    fn corrupt_env_is_rewritten_and_the_boot_marked_good_unarmed() {
        let t = Tree::new();
        t.cmdline("rd.kairos.boot_reason=cos:default");
        t.file("/oem/grubenv", [b'#'; 1000]);
        t.file(BOOT_STAGE_OK, "");
        let (r, out, err) = go(&t, Options::default());
        assert_eq!(r, Outcome::Done);
        let gp = t.ctx.grubenv_path();
        assert_eq!(
            err,
            format!(
                "kairos-agent: warning: {}: 1000 bytes, a GRUB environment block is exactly 1024; GRUB ignores it and boots its default entry\n",
                gp.display()
            )
        );
        assert_eq!(
            out,
            format!(
                "kairos-agent: rewrote {} as a valid empty environment block (boot assessment not armed)\n\
                 kairos-agent: boot marked good (entry=cos, boot assessment not armed)\n",
                gp.display()
            )
        );
        assert!(t.read_env().is_empty());
    }

    #[test]
    fn k3s_must_say_ok() {
        let t = Tree::new();
        tried(&t, "cos");
        t.file(BOOT_STAGE_OK, "");
        t.file(K3S_CONFIG, "write-kubeconfig-mode: 600\n");
        let before = t.read_env();
        // Configured but not installed.
        let (r, out, _) = go(&t, Options::default());
        assert_eq!(r, Outcome::Refused);
        assert!(out.contains("k3s is enabled but not installed"), "{out}");
        // Not ready.
        k3s(&t, "echo '[-]etcd failed: reason withheld'; exit 1");
        let (r, out, _) = go(&t, Options::default());
        assert_eq!(r, Outcome::Refused);
        assert!(
            out.contains("k3s is not ready: /readyz said \"[-]etcd failed: reason withheld\""),
            "{out}"
        );
        // Hanging.
        k3s(&t, "sleep 5");
        let opts = Options {
            k3s_timeout: Duration::from_millis(300),
            ..Options::default()
        };
        let start = Instant::now();
        let (r, out, _) = go(&t, opts);
        assert!(start.elapsed() < Duration::from_secs(4));
        assert_eq!(r, Outcome::Refused);
        assert!(out.contains("gave no answer within 0.3 s"), "{out}");
        assert_eq!(t.read_env(), before);
        // Ready, asked the right question.
        k3s(
            &t,
            r#"[ "$*" = "kubectl get --raw /readyz" ] && echo ok || echo "wrong args: $*""#,
        );
        let (r, out, _) = go(&t, Options::default());
        assert_eq!(r, Outcome::Done, "{out}");
        assert!(out.contains("tries reset to 3"), "{out}");
    }

    #[test]
    fn k3s_flag_checks_without_config() {
        let t = Tree::new();
        tried(&t, "cos");
        t.file(BOOT_STAGE_OK, "");
        let opts = Options {
            k3s: true,
            ..Options::default()
        };
        let (r, out, _) = go(&t, opts.clone());
        assert_eq!(r, Outcome::Refused);
        assert!(out.contains("not installed"), "{out}");
        // Without the flag and without a config, K3s is not asked.
        let (r, _, _) = go(&t, Options::default());
        assert_eq!(r, Outcome::Done);
    }
}
