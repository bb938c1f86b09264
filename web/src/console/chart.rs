//! Charts as inline SVG, drawn on the server: no script, nothing for the CSP to allow.
//! Colours are presentation attributes (a `style` attribute would need `'unsafe-inline'`).

use std::fmt::Write as _;

use optinsync_engine::templates::html_escape;

const W: f64 = 720.0;
const H: f64 = 220.0;
const LEFT: f64 = 44.0;
const RIGHT: f64 = 12.0;
const TOP: f64 = 12.0;
const BOTTOM: f64 = 28.0;

/// One line of a [`daily`] chart.
#[derive(Debug)]
pub struct Series<'a> {
    pub label: &'a str,
    pub colour: &'a str,
    pub values: Vec<i64>,
}

fn y_of(v: i64, max: i64) -> f64 {
    TOP + (H - TOP - BOTTOM) * (1.0 - v as f64 / max.max(1) as f64)
}

fn frame(out: &mut String, title: &str, max: i64) {
    let _ = write!(
        out,
        "<svg class=\"chart\" viewBox=\"0 0 {W} {H}\" role=\"img\" xmlns=\"http://www.w3.org/2000/svg\"><title>{}</title>\
         <rect x=\"0\" y=\"0\" width=\"{W}\" height=\"{H}\" fill=\"#ffffff\"/>",
        html_escape(title)
    );
    for (v, label) in [(0, "0".to_owned()), (max, max.to_string())] {
        let y = y_of(v, max);
        let _ = write!(
            out,
            "<line x1=\"{LEFT}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"#c8ccd2\" stroke-width=\"1\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"end\" fill=\"#444\">{label}</text>",
            W - RIGHT,
            LEFT - 6.0,
            y + 4.0
        );
    }
}

/// A line per series over `days` (one value per day, oldest first), with the first, middle
/// and last day under the axis.
pub fn daily(title: &str, days: &[String], series: &[Series<'_>]) -> String {
    let max = series
        .iter()
        .flat_map(|s| s.values.iter().copied())
        .max()
        .unwrap_or(0)
        .max(1);
    let mut out = String::new();
    frame(&mut out, title, max);
    let n = days.len().max(2);
    let x_of = |i: usize| LEFT + (W - LEFT - RIGHT) * i as f64 / (n - 1) as f64;
    for i in [0, days.len() / 2, days.len().saturating_sub(1)] {
        if let Some(day) = days.get(i) {
            let _ = write!(
                out,
                "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"middle\" fill=\"#444\">{}</text>",
                x_of(i).clamp(LEFT + 30.0, W - RIGHT - 30.0),
                H - 8.0,
                html_escape(day)
            );
        }
    }
    for s in series {
        let points: Vec<String> = s
            .values
            .iter()
            .enumerate()
            .map(|(i, v)| format!("{:.1},{:.1}", x_of(i), y_of(*v, max)))
            .collect();
        let _ = write!(
            out,
            "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"2\" points=\"{}\"><title>{}</title></polyline>",
            s.colour,
            points.join(" "),
            html_escape(s.label)
        );
    }
    out.push_str("</svg>");
    out
}

/// A bar per bucket, with vertical markers (`(bucket index, label)`) before the buckets
/// they name (a list's reminder and expiry windows).
pub fn histogram(title: &str, buckets: &[(String, i64)], markers: &[(usize, &str)]) -> String {
    let max = buckets.iter().map(|(_, n)| *n).max().unwrap_or(0).max(1);
    let mut out = String::new();
    frame(&mut out, title, max);
    let n = buckets.len().max(1) as f64;
    let slot = (W - LEFT - RIGHT) / n;
    for (i, (label, count)) in buckets.iter().enumerate() {
        let x = LEFT + slot * i as f64;
        let y = y_of(*count, max);
        let _ = write!(
            out,
            "<rect x=\"{:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"#3b6fb6\"><title>{}: {count}</title></rect>",
            x + 1.0,
            (slot - 2.0).max(1.0),
            (H - BOTTOM - y).max(0.0),
            html_escape(label)
        );
        if buckets.len() <= 16 || i % 5 == 0 {
            let _ = write!(
                out,
                "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\" text-anchor=\"middle\" fill=\"#444\">{}</text>",
                x + slot / 2.0,
                H - 8.0,
                html_escape(label)
            );
        }
    }
    for (i, label) in markers {
        let x = LEFT + slot * *i as f64;
        let _ = write!(
            out,
            "<line x1=\"{x:.1}\" y1=\"{TOP}\" x2=\"{x:.1}\" y2=\"{:.1}\" stroke=\"#c0392b\" stroke-width=\"2\" stroke-dasharray=\"5 3\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" fill=\"#c0392b\">{}</text>",
            H - BOTTOM,
            x + 4.0,
            TOP + 12.0,
            html_escape(label)
        );
    }
    out.push_str("</svg>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_escape_labels_and_scale_to_the_maximum() {
        let days = vec!["2026-01-01".to_owned(), "2026-01-02".to_owned()];
        let svg = daily(
            "<t>",
            &days,
            &[Series {
                label: "a<b",
                colour: "#000",
                values: vec![0, 7],
            }],
        );
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        assert!(svg.contains("&lt;t&gt;") && svg.contains("a&lt;b"));
        assert!(svg.contains(">7</text>"), "the axis names the maximum");
        let h = histogram(
            "h",
            &[("0d".into(), 3), ("1d".into(), 1)],
            &[(1, "reminder")],
        );
        assert_eq!(h.matches("<rect").count(), 3, "background and two bars");
        assert!(h.contains("reminder"));
    }
}
