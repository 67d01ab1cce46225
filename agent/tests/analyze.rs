//! `kairos-agent analyze` as a user runs it, on a fake /run: the three outputs, the error
//! for a boot kairos-init did not start, and the plot rendered to PNG by rsvg-convert
//! (librsvg2-bin, installed by `kairos-qemu setup`).

mod common;

use std::path::Path;
use std::process::Command;

use common::{agent, text};

const INIT: &str = r#"{"steps":[{"name":"modules","parent":null,"start_ms":810.0,"duration_ms":420.0},{"name":"devices","parent":null,"start_ms":1231.0,"duration_ms":60.0},{"name":"wait /dev/vda","parent":"devices","start_ms":1232.0,"duration_ms":55.0},{"name":"root","parent":null,"start_ms":1291.0,"duration_ms":30.0},{"name":"switch_root","parent":null,"start_ms":1330.0,"duration_ms":5.0}],"start_ms":800.0,"tsc_start":3600000000,"tsc_start_ms":800.0,"tsc_switch_root":5205000000,"tsc_switch_root_ms":1335.0}"#;
const AGENT: &str = r#"{"steps":[{"name":"start","parent":null,"start_ms":2000.0,"duration_ms":0.0},{"name":"stages","parent":null,"start_ms":2000.0,"duration_ms":300.0},{"name":"workloads","parent":null,"start_ms":2300.0,"duration_ms":100.0},{"name":"ready","parent":null,"start_ms":2400.0,"duration_ms":0.0}]}"#;
/// Every step's label as the SVG carries it.
const LABELS: &[&str] = &[
    "modules",
    "devices",
    "devices: wait /dev/vda",
    "root",
    "switch_root",
    "start",
    "stages",
    "workloads",
    "ready",
    "kernel",
    "firmware+loader",
];

fn node() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run/kairos");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::write(run.join("boot-timeline.json"), INIT).unwrap();
    std::fs::write(run.join("agent-timeline.json"), AGENT).unwrap();
    dir
}

#[test]
fn time_and_blame() {
    let dir = node();
    let (code, out, err) = text(&agent(dir.path(), &["analyze", "time"]));
    assert_eq!(code, 0, "{err}");
    // TSC: 1.605e9 ticks in 535 ms = 3 GHz; 3.6e9 at 800 ms = 1.2 s, so 400 ms before t=0.
    assert_eq!(
        out.lines().next().unwrap(),
        "Startup finished in 400ms (firmware+loader) + 800ms (kernel) + 535ms (initramfs) + 1.065s (userland) = 2.800s"
    );
    let (code, out, err) = text(&agent(dir.path(), &["analyze", "blame"]));
    assert_eq!(code, 0, "{err}");
    let first: Vec<&str> = out.lines().take(3).collect();
    assert_eq!(
        first,
        [
            "    800ms kernel: to kairos-init's start",
            "    665ms userland: switch_root to the agent's start",
            "    420ms kairos-init: modules",
        ],
        "{out}"
    );
}

#[test]
fn not_booted_by_kairos_init_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out, err) = text(&agent(dir.path(), &["analyze", "time"]));
    assert_eq!(code, 2);
    assert!(out.is_empty(), "{out}");
    let want = dir.path().join("run/kairos/boot-timeline.json");
    assert!(
        err.contains(&format!("{}: not found", want.display())),
        "{err}"
    );
}

/// width and height from a PNG's IHDR chunk.
fn png_size(png: &[u8]) -> (u32, u32) {
    assert!(png.len() > 24, "PNG of {} bytes", png.len());
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    assert_eq!(&png[12..16], b"IHDR");
    let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    (be(&png[16..20]), be(&png[20..24]))
}

/// The `width="N"` of the root element.
fn svg_attr(svg: &str, name: &str) -> u32 {
    let root = &svg[svg.find("<svg").unwrap()..];
    let at = root.find(&format!(" {name}=\"")).unwrap() + name.len() + 3;
    root[at..].split('"').next().unwrap().parse().unwrap()
}

#[test]
fn plot_renders_to_png_with_every_label() {
    let dir = node();
    let (code, svg, err) = text(&agent(dir.path(), &["analyze", "plot"]));
    assert_eq!(code, 0, "{err}");
    for label in LABELS {
        assert!(svg.contains(&format!(">{label}</text>")), "{label}: {svg}");
    }
    let svg_path = dir.path().join("boot.svg");
    let png_path = dir.path().join("boot.png");
    std::fs::write(&svg_path, &svg).unwrap();
    let rsvg = Command::new("rsvg-convert")
        .arg("-o")
        .arg(&png_path)
        .arg(&svg_path)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "rsvg-convert could not be run ({e}): install librsvg2-bin (`kairos-qemu setup` does)"
            )
        });
    assert!(
        rsvg.status.success(),
        "rsvg-convert refused the plot: {}",
        String::from_utf8_lossy(&rsvg.stderr)
    );
    let (w, h) = png_size(&std::fs::read(Path::new(&png_path)).unwrap());
    assert_eq!((w, h), (svg_attr(&svg, "width"), svg_attr(&svg, "height")));
    // 11 step rows, 4 phase rows, 3 headings at 18 px, a 1000-px plot.
    assert!(w >= 1000 && h >= 18 * 18, "{w}x{h}");
}
