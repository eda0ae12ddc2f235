//! bench.svg: one bar chart per headline figure, medians with min–max
//! whiskers, so the run can be read at a glance.
use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::{coord::Shift, prelude::*};

use super::{
    forwarders::{Kind, ALL},
    report::{num, Report},
    workloads::*,
};

/// (workload, metric, panel title).
const PANELS: [(&str, &str, &str); 8] = [
    (BULK1, "gb_per_s", "bulk, 1 connection: GB/s ↑"),
    (BULK4, "gb_per_s", "bulk, 4 connections: GB/s ↑"),
    (
        BULK1,
        "forwarder_cpu_s_per_gb",
        "forwarder CPU s per GB (1 conn) ↓",
    ),
    (PINGPONG, "p50_us", "ping-pong p50 µs ↓"),
    (CONNRATE, "conns_per_s", "short connections/s ↑"),
    (
        CONNRATE,
        "forwarder_cpu_us_per_conn",
        "forwarder CPU µs per connection ↓",
    ),
    (
        IDLE,
        "forwarder_rss_bytes_per_conn",
        "forwarder RSS bytes per idle conn ↓",
    ),
    (MQTT0, "msgs_per_s", "MQTT QoS 0 msg/s ↑"),
];

/// Bar labels, short enough for a narrow panel.
fn short(k: Kind) -> &'static str {
    match k {
        Kind::Direct => "direct",
        Kind::Splicer => "splicer",
        Kind::SplicerNow => "handoff now",
        Kind::SplicerUserspace => "userspace",
        Kind::Haproxy => "haproxy",
        Kind::HaproxySplice => "hap.splice",
        Kind::Nginx => "nginx",
    }
}

fn color(k: Kind) -> RGBColor {
    match k {
        Kind::Direct => RGBColor(150, 150, 150),
        Kind::Splicer => RGBColor(31, 119, 180),
        Kind::SplicerNow => RGBColor(23, 190, 207),
        Kind::SplicerUserspace => RGBColor(140, 190, 230),
        Kind::Haproxy => RGBColor(230, 120, 20),
        Kind::HaproxySplice => RGBColor(250, 180, 90),
        Kind::Nginx => RGBColor(44, 160, 44),
    }
}

pub fn draw(path: &Path, r: &Report) -> Result<()> {
    let root = SVGBackend::new(path, (1600, 800)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let title = format!(
        "splicer vs HAProxy vs nginx, loopback, {} cores, Linux {} (median of {}, whiskers min–max)",
        r.machine.cores, r.machine.kernel, r.plan.reps
    );
    let body = root.titled(&title, ("sans-serif", 20)).map_err(err)?;
    for (area, (workload, metric, caption)) in body.split_evenly((2, 4)).iter().zip(PANELS) {
        panel(area, r, workload, metric, caption)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

fn panel(
    area: &DrawingArea<SVGBackend, Shift>,
    r: &Report,
    workload: &str,
    metric: &str,
    caption: &str,
) -> Result<()> {
    // Direct has no forwarder, so no forwarder cost to show.
    let own_cost = metric.starts_with("forwarder_");
    let bars: Vec<_> = ALL
        .iter()
        .enumerate()
        .filter(|(_, k)| !(own_cost && **k == Kind::Direct))
        .filter_map(|(i, k)| Some((i, *k, r.stat(workload, *k, metric)?)))
        .collect();
    let top = bars.iter().map(|b| b.2.max).fold(0.0, f64::max);
    let top = if top > 0.0 { top * 1.15 } else { 1.0 };
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 15))
        .margin(8)
        .x_label_area_size(24)
        .y_label_area_size(52)
        .build_cartesian_2d((0..ALL.len() - 1).into_segmented(), 0f64..top)
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .light_line_style(WHITE)
        .x_labels(ALL.len())
        .x_label_style(("sans-serif", 11))
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => ALL.get(*i).map(|k| short(*k)).unwrap_or("").to_string(),
            _ => String::new(),
        })
        .y_label_formatter(&|v| num(*v))
        .draw()
        .map_err(err)?;
    chart
        .draw_series(bars.iter().map(|(i, k, st)| {
            let mut bar = Rectangle::new(
                [
                    (SegmentValue::Exact(*i), 0.0),
                    (SegmentValue::Exact(*i + 1), st.median),
                ],
                color(*k).filled(),
            );
            bar.set_margin(0, 0, 5, 5);
            bar
        }))
        .map_err(err)?;
    chart
        .draw_series(bars.iter().filter(|b| b.2.n > 1).map(|(i, _, st)| {
            ErrorBar::new_vertical(
                SegmentValue::CenterOf(*i),
                st.min,
                st.median,
                st.max,
                BLACK.filled(),
                8,
            )
        }))
        .map_err(err)?;
    Ok(())
}

/// plotters' errors borrow nothing but are not all Send; keep the message.
fn err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("drawing the chart: {e}")
}
