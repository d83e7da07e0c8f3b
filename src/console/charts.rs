//! Charts as server-side SVG, drawn by plotters (no script, no asset from elsewhere). Every
//! data point of a line chart is also drawn as a `<circle>`, every bar as a `<rect>`, and the
//! wrapping `<figure>` carries the counts as `data-points` / `data-bars`, so a test (or a reader
//! of the page source) can check what was plotted.

use plotters::prelude::*;

const WIDTH: u32 = 720;
const HEIGHT: u32 = 260;

/// One named line.
pub struct Line {
    pub name: String,
    pub values: Vec<f64>,
}

/// `12345` -> `12.3k`: axis labels stay short.
pub fn human(v: f64) -> String {
    let a = v.abs();
    if a >= 1e9 {
        format!("{:.1}G", v / 1e9)
    } else if a >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.1}k", v / 1e3)
    } else if a.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn figure(kind: &str, count: usize, title: &str, svg: &str) -> String {
    let title = title
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;");
    format!(
        "<figure class=\"chart\" data-{kind}=\"{count}\"><figcaption>{title}</figcaption>{svg}</figure>"
    )
}

/// A line chart over the buckets `labels` (x) with one line per series, points marked.
pub fn lines(title: &str, labels: &[String], lines: &[Line]) -> String {
    let mut svg = String::new();
    let points: usize = lines.iter().map(|l| l.values.len()).sum();
    let drawn = draw_lines(&mut svg, labels, lines);
    if let Err(e) = drawn {
        tracing::warn!(error = %e, "chart not drawn");
        return figure("points", 0, title, "<p>chart unavailable</p>");
    }
    figure("points", points, title, &svg)
}

fn draw_lines(
    svg: &mut String,
    labels: &[String],
    lines: &[Line],
) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::with_string(svg, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE)?;
    let ymax = lines
        .iter()
        .flat_map(|l| l.values.iter().copied())
        .fold(0.0f64, f64::max)
        .max(1.0)
        * 1.1;
    let xmax = (labels.len().max(2) - 1) as f64;
    let mut chart = ChartBuilder::on(&root)
        .margin(8)
        .x_label_area_size(28)
        .y_label_area_size(52)
        .build_cartesian_2d(0f64..xmax, 0f64..ymax)?;
    let label_of = |x: &f64| {
        let i = x.round();
        if (x - i).abs() > 1e-6 {
            return String::new();
        }
        labels.get(i as usize).cloned().unwrap_or_default()
    };
    chart
        .configure_mesh()
        .x_labels(labels.len().min(7))
        .x_label_formatter(&label_of)
        .y_labels(5)
        .y_label_formatter(&|y| human(*y))
        .light_line_style(RGBColor(238, 238, 238))
        .draw()?;
    for (i, line) in lines.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let pts: Vec<(f64, f64)> = line
            .values
            .iter()
            .enumerate()
            .map(|(x, y)| (x as f64, *y))
            .collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(line.name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
        chart.draw_series(pts.iter().map(|p| Circle::new(*p, 2, color.filled())))?;
    }
    if !lines.is_empty() {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK.mix(0.2))
            .draw()?;
    }
    root.present()?;
    Ok(())
}

/// A horizontal-label bar chart: one bar per `(label, value)`.
pub fn bars(title: &str, bars: &[(String, f64)]) -> String {
    let mut svg = String::new();
    if let Err(e) = draw_bars(&mut svg, bars) {
        tracing::warn!(error = %e, "chart not drawn");
        return figure("bars", 0, title, "<p>chart unavailable</p>");
    }
    figure("bars", bars.len(), title, &svg)
}

fn draw_bars(svg: &mut String, bars: &[(String, f64)]) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::with_string(svg, (WIDTH / 2, HEIGHT)).into_drawing_area();
    root.fill(&WHITE)?;
    let ymax = bars.iter().map(|b| b.1).fold(0.0f64, f64::max).max(1.0) * 1.1;
    let n = bars.len().max(1);
    let mut chart = ChartBuilder::on(&root)
        .margin(8)
        .x_label_area_size(28)
        .y_label_area_size(52)
        .build_cartesian_2d(0f64..n as f64, 0f64..ymax)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_labels(5)
        .y_label_formatter(&|y| human(*y))
        .draw()?;
    chart.draw_series(bars.iter().enumerate().map(|(i, (_, v))| {
        let color = Palette99::pick(i).to_rgba();
        Rectangle::new(
            [(i as f64 + 0.15, 0.0), (i as f64 + 0.85, *v)],
            color.filled(),
        )
    }))?;
    // Each bar's name and value above it (axis labels would not sit under every bar).
    chart.draw_series(bars.iter().enumerate().map(|(i, (label, v))| {
        Text::new(
            format!("{label}: {}", human(*v)),
            (i as f64 + 0.15, *v + ymax * 0.02),
            ("sans-serif", 12),
        )
    }))?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_point_and_bar_is_drawn() {
        let labels: Vec<String> = (0..5).map(|i| format!("t{i}")).collect();
        let svg = lines(
            "requests",
            &labels,
            &[
                Line {
                    name: "a".into(),
                    values: vec![1.0, 2.0, 0.0, 4.0, 5.0],
                },
                Line {
                    name: "b".into(),
                    values: vec![0.0; 5],
                },
            ],
        );
        assert!(svg.contains("data-points=\"10\""), "{svg}");
        assert_eq!(svg.matches("<circle").count(), 10);
        assert!(svg.contains("t0") && svg.contains("t4"));
        let svg = bars("mix", &[("m1".into(), 3.0), ("m2".into(), 7.0)]);
        assert!(svg.contains("data-bars=\"2\""));
        assert!(svg.contains("m1") && svg.contains("m2"));
        assert_eq!(human(12_345.0), "12.3k");
        assert_eq!(human(3.0), "3");
    }
}
