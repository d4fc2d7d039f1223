//! `timeline.svg`: one memory panel per importer (its cgroup's usage, dirty + writeback, the `kubectl top`
//! working set, the whole limited cgroup's usage, and the limit), on the same axes so they compare at a glance,
//! and a panel of the co-tenant's allocation latencies for every importer.

use super::sampler::Sample;
use crate::error::{Error, ErrorKind, Result};
use plotters::prelude::*;
use std::path::Path;

const MIB: f64 = (1u64 << 20) as f64;
const FONT: &str = "sans-serif";

const IMPORTER: RGBColor = RGBColor(31, 119, 180);
const DIRTY: RGBColor = RGBColor(255, 127, 14);
const KUBECTL: RGBColor = RGBColor(44, 160, 44);
const POD: RGBColor = RGBColor(150, 150, 150);
const LIMIT: RGBColor = RGBColor(214, 39, 40);
/// Colours of the co-tenant latency series, one per importer in run order.
const STALL_COLOURS: [RGBColor; 4] =
    [RGBColor(214, 39, 40), RGBColor(31, 119, 180), RGBColor(148, 103, 189), RGBColor(140, 86, 75)];

/// One importer's data for the plot.
pub struct PlotRun<'a> {
    /// Importer name.
    pub importer: &'a str,
    /// Its verdict, shown in the panel title.
    pub verdict: &'a str,
    /// The sampled timeline.
    pub samples: &'a [Sample],
    /// Co-tenant rounds: seconds since start and latency in ms.
    pub stalls: Vec<(f64, f64)>,
}

/// Renders the runs to an SVG file at `path`.
pub fn render(path: &Path, limit: u64, write_bps: Option<u64>, runs: &[PlotRun<'_>]) -> Result<()> {
    let panels = runs.len() + 1;
    let root = SVGBackend::new(path, (1200, 380 * panels as u32 + 40)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let bandwidth = write_bps.map_or_else(
        || "unthrottled writes".to_string(),
        |bps| format!("writes throttled to {:.0} MB/s", bps as f64 / 1e6),
    );
    let root = root
        .titled(
            &format!(
                "Memory cgroup limited to {:.0} MiB ({:.0} MB), {bandwidth}",
                limit as f64 / MIB,
                limit as f64 / 1e6
            ),
            (FONT, 24),
        )
        .map_err(plot_error)?;
    let areas = root.split_evenly((panels, 1));

    let x_max = nice_ceiling(runs.iter().flat_map(|r| r.samples.last().map(|s| s.t)).fold(1.0, f64::max) * 1.02);
    for (area, run) in areas.iter().zip(runs) {
        memory_panel(area, run, limit, x_max, panel_scale(run, limit))?;
    }
    if let Some(area) = areas.last() {
        stall_panel(area, runs, x_max)?;
    }
    root.present().map_err(plot_error)?;
    Ok(())
}

fn memory_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    run: &PlotRun<'_>,
    limit: u64,
    x_max: f64,
    y_max: f64,
) -> Result<()> {
    let mut chart = ChartBuilder::on(area)
        .caption(format!("{}: {}", run.importer, run.verdict), (FONT, 20))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(75)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc("seconds since the importer started")
        .y_desc("MiB")
        .axis_desc_style((FONT, 16))
        .label_style((FONT, 14))
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(plot_error)?;

    let lines: [MemoryLine; 4] = [
        ("whole cgroup (importer + co-tenant)", POD, 2, |s| mib(s.pod.usage)),
        ("importer usage", IMPORTER, 3, |s| mib(s.importer.usage)),
        ("importer kubectl top (usage - inactive_file)", KUBECTL, 2, |s| mib(s.importer.working_set())),
        ("importer dirty + writeback", DIRTY, 2, |s| mib(s.importer.dirty_writeback())),
    ];
    for (label, colour, width, value) in lines {
        let style = colour.stroke_width(width);
        chart
            .draw_series(LineSeries::new(run.samples.iter().map(|s| (s.t, value(s))), style))
            .map_err(plot_error)?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], style));
    }
    let label = if mib(limit) <= y_max {
        chart
            .draw_series(DashedLineSeries::new([(0.0, mib(limit)), (x_max, mib(limit))], 10, 6, LIMIT.stroke_width(2)))
            .map_err(plot_error)?;
        (format!("limit {:.0} MiB", mib(limit)), mib(limit) + y_max * 0.04)
    } else {
        (format!("limit {:.0} MiB: far above this panel's scale", mib(limit)), y_max * 0.93)
    };
    chart
        .draw_series(std::iter::once(Text::new(label.0, (x_max * 0.01, label.1), (FONT, 14).into_font().color(&LIMIT))))
        .map_err(plot_error)?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font((FONT, 13))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .draw()
        .map_err(plot_error)?;
    Ok(())
}

fn stall_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    runs: &[PlotRun<'_>],
    x_max: f64,
) -> Result<()> {
    let worst = runs.iter().flat_map(|r| r.stalls.iter().map(|&(_, ms)| ms)).fold(10.0, f64::max);
    let mut chart = ChartBuilder::on(area)
        .caption(
            "co-tenant: each round of allocating and touching its block, drawn from its start to its end (log scale)",
            (FONT, 20),
        )
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(75)
        .build_cartesian_2d(0f64..x_max, (1f64..worst * 2.0).log_scale())
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc("seconds since the importer started")
        .y_desc("ms")
        .axis_desc_style((FONT, 16))
        .label_style((FONT, 14))
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(plot_error)?;
    for (run, colour) in runs.iter().zip(STALL_COLOURS.iter().cycle()) {
        let style = colour.stroke_width(2);
        let rounds: Vec<(f64, f64)> =
            run.stalls.iter().filter(|&&(t, _)| t >= 0.0).map(|&(t, ms)| (t, ms.max(1.0))).collect();
        // Each round spans from when it started to when it ended, at the height of its latency: a long stall
        // reads as a long bar, not as a slope between two rounds.
        chart
            .draw_series(
                rounds
                    .iter()
                    .map(|&(end, ms)| PathElement::new(vec![((end - ms / 1000.0).max(0.0), ms), (end, ms)], style)),
            )
            .map_err(plot_error)?;
        chart
            .draw_series(rounds.iter().map(|&point| Circle::new(point, 2, colour.filled())))
            .map_err(plot_error)?
            .label(format!("during {}", run.importer))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], style));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .draw()
        .map_err(plot_error)?;
    Ok(())
}

/// The top of a memory panel's axis, in MiB: a round number above the limit when the run came near it (so runs
/// that did compare on one scale), or, for a run that stayed far below, a round number above its own highest line
/// (a 20 MiB line on an 800 MiB axis is flat at the bottom and says nothing). Head room is left for the legend.
fn panel_scale(run: &PlotRun<'_>, limit: u64) -> f64 {
    let highest = run.samples.iter().map(|s| s.pod.usage.max(s.importer.usage)).max().unwrap_or(0);
    if highest as f64 > limit as f64 * 0.4 {
        nice_ceiling(mib(limit) * 1.45)
    } else {
        nice_ceiling((mib(highest) * 1.6).max(1.0))
    }
}

/// The smallest of 1, 2, 2.5, 5 × a power of ten that is at least `value`: axis ends whose labels come out round.
fn nice_ceiling(value: f64) -> f64 {
    let power = 10f64.powf(value.max(f64::MIN_POSITIVE).log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0].iter().map(|m| m * power).find(|&v| v >= value).unwrap_or(10.0 * power)
}

/// A line of a memory panel: legend label, colour, stroke width, and the value it plots in MiB.
type MemoryLine = (&'static str, RGBColor, u32, fn(&Sample) -> f64);

fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB
}

fn plot_error(e: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Io, format!("drawing timeline.svg: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroup::{MemEvents, MemStat};

    #[test]
    fn renders_an_svg_with_every_importer() {
        let samples: Vec<Sample> = (0..50)
            .map(|i| Sample {
                t: f64::from(i) * 0.1,
                importer: MemStat { usage: (i as u64 * 10) << 20, dirty: (i as u64) << 20, ..MemStat::default() },
                pod: MemStat { usage: (i as u64 * 10 + 64) << 20, ..MemStat::default() },
                pod_events: MemEvents::default(),
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.svg");
        let runs = [
            PlotRun {
                importer: "qemu-img",
                verdict: "PINNED",
                samples: &samples,
                stalls: vec![(0.5, 20.0), (1.0, 3000.0)],
            },
            PlotRun { importer: "boundimport", verdict: "BOUNDED", samples: &samples[..10], stalls: vec![] },
        ];
        render(&path, 600_000_000, Some(30_000_000), &runs).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.contains("<svg"));
        assert!(svg.contains("qemu-img: PINNED") && svg.contains("boundimport: BOUNDED"));
        assert!(svg.contains("limit"));
        // The bounded run has a scale of its own, and says where the limit is.
        assert!(svg.contains("far above this panel"), "one panel should be scaled to its run");
    }

    #[test]
    fn axis_ends_are_round() {
        for (value, want) in
            [(0.7, 1.0), (1.0, 1.0), (1.3, 2.0), (21.0, 25.0), (32.0, 50.0), (829.7, 1000.0), (7.5, 10.0)]
        {
            assert_eq!(nice_ceiling(value), want, "{value}");
        }
    }
}
