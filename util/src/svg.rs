//! A Gantt-style SVG timeline, no drawing crate: rows of `(label, start, end, class)` in
//! seconds, optionally in titled groups, over shaded phase bands, with a seconds axis. Used by
//! `kairos-agent analyze plot` (one row per boot step, bands for firmware, kernel, initramfs
//! and userland) and by `kairos-qemu bench --svg` (one group per variant, one row per
//! milestone).
//!
//! ```
//! use kairos_util::svg::{Band, Chart, Group, Row};
//! let chart = Chart {
//!     title: "boot".into(),
//!     bands: vec![Band::new("kernel", 0.0, 1.2, "kernel")],
//!     groups: vec![Group::new(vec![Row::new("mount root", 1.3, 1.5, "init")])],
//! };
//! let svg = kairos_util::svg::render(&chart);
//! assert!(svg.contains(">mount root<"));
//! ```
//!
//! Every label is a `<text>` element with its text XML-escaped ([`escape`]), so a test can
//! look for `>{escape(label)}<` in the output. Colours come from the class (known names:
//! `firmware`, `loader`, `kernel`, `initramfs`, `userland`, `init`, `agent`, `ready`,
//! `ours`, `stock`; any other class gets a stable colour from a small palette) and are
//! written as `fill` attributes, so renderers without CSS (rsvg-convert, browsers, image
//! viewers) draw the same thing.

use std::fmt::Write;

/// One bar: `label` drawn left of the plot, the bar from `start` to `end` seconds, its
/// duration written after it.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub label: String,
    pub start: f64,
    pub end: f64,
    pub class: String,
}

impl Row {
    pub fn new(label: impl Into<String>, start: f64, end: f64, class: impl Into<String>) -> Row {
        Row {
            label: label.into(),
            start,
            end,
            class: class.into(),
        }
    }
}

/// Rows drawn together under an optional heading (e.g. a bench variant).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Group {
    pub heading: Option<String>,
    pub rows: Vec<Row>,
}

impl Group {
    /// A group without a heading.
    pub fn new(rows: Vec<Row>) -> Group {
        Group {
            heading: None,
            rows,
        }
    }

    pub fn titled(heading: impl Into<String>, rows: Vec<Row>) -> Group {
        Group {
            heading: Some(heading.into()),
            rows,
        }
    }
}

/// A phase shaded behind all rows from `start` to `end` seconds, its label at the top.
#[derive(Debug, Clone, PartialEq)]
pub struct Band {
    pub label: String,
    pub start: f64,
    pub end: f64,
    pub class: String,
}

impl Band {
    pub fn new(label: impl Into<String>, start: f64, end: f64, class: impl Into<String>) -> Band {
        Band {
            label: label.into(),
            start,
            end,
            class: class.into(),
        }
    }
}

/// The whole picture. Times are seconds; the axis starts at 0 or at the earliest start if
/// that is negative (firmware before the kernel's t=0).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Chart {
    pub title: String,
    pub bands: Vec<Band>,
    pub groups: Vec<Group>,
}

/// Pixel layout.
const PLOT_WIDTH: f64 = 900.0;
const ROW_HEIGHT: f64 = 18.0;
const BAR_HEIGHT: f64 = 12.0;
const CHAR_WIDTH: f64 = 7.0;
const TOP: f64 = 64.0;
const MARGIN: f64 = 10.0;
/// Room right of the plot for the duration written after the last bar.
const RIGHT: f64 = 90.0;

/// `&`, `<`, `>`, `"` and `'` as XML entities, and characters XML 1.0 forbids (control
/// characters other than tab and newline) dropped: a label can be any step name.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' => out.push(' '),
            c if (c as u32) < 0x20 || c == '\u{fffe}' || c == '\u{ffff}' => {}
            c => out.push(c),
        }
    }
    out
}

/// The fill colour of a class.
pub fn colour(class: &str) -> &'static str {
    match class {
        "firmware" => "#b0b0b0",
        "loader" => "#c9b38a",
        "kernel" => "#f2c57c",
        "initramfs" => "#8fc1e3",
        "userland" => "#a8d5a2",
        "init" => "#3b7dd8",
        "agent" => "#2e9e5b",
        "ready" => "#d8563b",
        "ours" => "#3b7dd8",
        "stock" => "#999999",
        other => {
            const PALETTE: [&str; 6] = [
                "#7b61c9", "#c9617b", "#61a9c9", "#c9a261", "#61c98a", "#8a8a3b",
            ];
            // A stable pick (FNV-1a) so a class keeps its colour across charts.
            let h = other.bytes().fold(0x811c_9dc5_u32, |h, b| {
                (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
            });
            PALETTE[h as usize % PALETTE.len()]
        }
    }
}

/// A class as an XML attribute value: letters, digits, `-` and `_`.
fn class_attr(class: &str) -> String {
    class
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .collect()
}

/// A tick step of 1, 2 or 5 × 10^n seconds giving at most about 20 ticks over `span`.
fn tick_step(span: f64) -> f64 {
    let mut step = 0.001;
    loop {
        for m in [1.0, 2.0, 5.0] {
            if span / (step * m) <= 20.0 {
                return step * m;
            }
        }
        step *= 10.0;
    }
}

/// A duration as people read it: `850ms`, `1.234s`, `75.2s`.
pub fn duration(secs: f64) -> String {
    if secs < 1.0 {
        format!("{:.0}ms", secs * 1000.0)
    } else if secs < 60.0 {
        format!("{secs:.3}s")
    } else {
        format!("{secs:.1}s")
    }
}

/// A tick value without trailing zeros: `0.5s`, `2s`.
fn tick_label(t: f64) -> String {
    let s = format!("{t:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    format!("{s}s")
}

/// Draws `chart` as a standalone SVG document. Non-finite times are drawn at 0; a row
/// whose end is before its start is drawn as a zero-length bar (its duration says 0ms).
pub fn render(chart: &Chart) -> String {
    let fin = |x: f64| if x.is_finite() { x } else { 0.0 };
    let times = chart
        .bands
        .iter()
        .flat_map(|b| [b.start, b.end])
        .chain(
            chart
                .groups
                .iter()
                .flat_map(|g| &g.rows)
                .flat_map(|r| [r.start, r.end]),
        )
        .map(fin);
    let (mut t0, mut t1) = (0.0_f64, 0.0_f64);
    for t in times {
        t0 = t0.min(t);
        t1 = t1.max(t);
    }
    let span = if t1 - t0 > 0.0 { t1 - t0 } else { 1.0 };
    let scale = PLOT_WIDTH / span;

    let longest = chart
        .groups
        .iter()
        .flat_map(|g| g.rows.iter().map(|r| r.label.chars().count()))
        .chain(
            chart
                .groups
                .iter()
                .filter_map(|g| g.heading.as_ref().map(|h| h.chars().count())),
        )
        .max()
        .unwrap_or(0);
    let left = MARGIN + (longest as f64 * CHAR_WIDTH).clamp(60.0, 420.0) + 10.0;
    let x = |t: f64| left + (fin(t) - t0) * scale;

    let lines: usize = chart
        .groups
        .iter()
        .map(|g| g.rows.len() + usize::from(g.heading.is_some()))
        .sum();
    let plot_bottom = TOP + lines as f64 * ROW_HEIGHT + 6.0;
    let width = left + PLOT_WIDTH + RIGHT;
    let height = plot_bottom + 30.0;

    let mut s = String::new();
    let _ = writeln!(
        s,
        r##"<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="sans-serif" font-size="12">
<rect x="0" y="0" width="{width:.0}" height="{height:.0}" fill="#ffffff"/>
<text x="{MARGIN}" y="20" font-size="15" font-weight="bold">{}</text>"##,
        escape(&chart.title)
    );

    // Phase bands behind everything, their labels in a line above the plot.
    for b in &chart.bands {
        let (bx, bw) = (x(b.start), ((fin(b.end) - fin(b.start)) * scale).max(0.0));
        let _ = writeln!(
            s,
            r#"<rect class="band {}" x="{bx:.1}" y="{:.1}" width="{bw:.1}" height="{:.1}" fill="{}" fill-opacity="0.35"/>
<text class="band-label" x="{:.1}" y="{:.1}" font-size="11">{}</text>"#,
            class_attr(&b.class),
            TOP - 22.0,
            plot_bottom - TOP + 22.0,
            colour(&b.class),
            bx + 3.0,
            TOP - 8.0,
            escape(&b.label)
        );
    }

    // The seconds axis: a grid line and a label per tick, at the top and bottom.
    let step = tick_step(span);
    let first = (t0 / step).ceil() as i64;
    let last = (t1 / step).floor() as i64;
    for i in first..=last {
        let t = i as f64 * step;
        let tx = x(t);
        let _ = writeln!(
            s,
            r##"<line x1="{tx:.1}" y1="{:.1}" x2="{tx:.1}" y2="{plot_bottom:.1}" stroke="#dddddd" stroke-width="1"/>
<text class="tick" x="{tx:.1}" y="{:.1}" font-size="10" text-anchor="middle">{}</text>"##,
            TOP - 4.0,
            plot_bottom + 14.0,
            tick_label(t)
        );
    }

    // The rows.
    let mut y = TOP;
    for g in &chart.groups {
        if let Some(h) = &g.heading {
            let _ = writeln!(
                s,
                r#"<text class="heading" x="{MARGIN}" y="{:.1}" font-weight="bold">{}</text>"#,
                y + BAR_HEIGHT,
                escape(h)
            );
            y += ROW_HEIGHT;
        }
        for r in &g.rows {
            let (start, end) = (fin(r.start), fin(r.end).max(fin(r.start)));
            let (rx, rw) = (x(start), ((end - start) * scale).max(1.0));
            let indent = if g.heading.is_some() { 12.0 } else { 0.0 };
            let _ = writeln!(
                s,
                r#"<text class="label" x="{:.1}" y="{:.1}">{}</text>
<rect class="bar {}" x="{rx:.1}" y="{:.1}" width="{rw:.1}" height="{BAR_HEIGHT}" fill="{}"/>
<text class="duration" x="{:.1}" y="{:.1}" font-size="10">{}</text>"#,
                MARGIN + indent,
                y + BAR_HEIGHT - 1.0,
                escape(&r.label),
                class_attr(&r.class),
                y + 2.0,
                colour(&r.class),
                rx + rw + 4.0,
                y + BAR_HEIGHT - 1.0,
                if end > start {
                    duration(end - start)
                } else {
                    // A moment (ready, marked good): when, not how long.
                    format!("at {}", duration(start))
                }
            );
            y += ROW_HEIGHT;
        }
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chart() -> Chart {
        Chart {
            title: "boot <test>".into(),
            bands: vec![
                Band::new("firmware+loader", -1.5, 0.0, "firmware"),
                Band::new("kernel", 0.0, 1.2, "kernel"),
                Band::new("initramfs", 1.2, 2.0, "initramfs"),
            ],
            groups: vec![
                Group::new(vec![
                    Row::new("load modules", 1.2, 1.6, "init"),
                    Row::new("mount \"root\" & <friends>", 1.6, 1.9, "init"),
                ]),
                Group::titled("agent", vec![Row::new("k3s started", 2.5, 4.0, "agent")]),
            ],
        }
    }

    #[test]
    fn escapes_markup_and_drops_control_characters() {
        assert_eq!(
            escape(r#"a<b>&"c"'d'"#),
            "a&lt;b&gt;&amp;&quot;c&quot;&apos;d&apos;"
        );
        assert_eq!(escape("x\u{1}y\tz"), "xy z");
    }

    #[test]
    fn every_label_is_a_text_element() {
        let c = chart();
        let svg = render(&c);
        assert!(svg.starts_with("<?xml"));
        assert!(svg.trim_end().ends_with("</svg>"));
        for label in c
            .groups
            .iter()
            .flat_map(|g| {
                g.rows
                    .iter()
                    .map(|r| r.label.clone())
                    .chain(g.heading.clone())
            })
            .chain(c.bands.iter().map(|b| b.label.clone()))
            .chain([c.title.clone()])
        {
            assert!(
                svg.contains(&format!(">{}</text>", escape(&label))),
                "{label} missing in {svg}"
            );
        }
        // No raw markup from a label leaks into the document.
        assert!(!svg.contains("<friends>"));
        assert!(!svg.contains("<test>"));
        // One bar per row, one shaded rectangle per band.
        assert_eq!(svg.matches(r#"class="bar "#).count(), 3);
        assert_eq!(svg.matches(r#"class="band "#).count(), 3);
    }

    #[test]
    fn axis_covers_negative_firmware_time_and_the_end() {
        let svg = render(&chart());
        assert!(
            svg.contains(">-1.5s</text>") || svg.contains(">-1s</text>"),
            "{svg}"
        );
        assert!(svg.contains(">4s</text>"), "{svg}");
        assert!(svg.contains(">0s</text>"), "{svg}");
    }

    #[test]
    fn durations_and_ticks() {
        assert_eq!(duration(0.0421), "42ms");
        assert_eq!(duration(1.5), "1.500s");
        assert_eq!(duration(75.25), "75.2s");
        assert_eq!(tick_step(4.0), 0.2);
        assert_eq!(tick_step(60.0), 5.0);
        assert_eq!(tick_label(0.5), "0.5s");
        assert_eq!(tick_label(2.0), "2s");
    }

    #[test]
    fn empty_and_non_finite_charts_still_render() {
        let svg = render(&Chart::default());
        assert!(svg.contains("</svg>"));
        let c = Chart {
            title: String::new(),
            bands: vec![],
            groups: vec![Group::new(vec![Row::new("nan", f64::NAN, 2.0, "x")])],
        };
        let svg = render(&c);
        assert!(!svg.contains("NaN"), "{svg}");
        assert!(svg.contains(">nan</text>"));
    }

    #[test]
    fn colours_are_stable() {
        assert_eq!(colour("kernel"), "#f2c57c");
        assert_eq!(colour("whatever"), colour("whatever"));
        assert_eq!(class_attr("a b\"<c"), "abc");
    }
}
