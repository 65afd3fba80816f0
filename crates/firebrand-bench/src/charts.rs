//! `charts`: how cost grows with work, drawn beside the raw baseline in the same run, as SVG
//! (plotters), for the README:
//!
//! - `idle-rss.svg`: server RSS per idle joined connection against connections (`--conns`
//!   sizes, default 1k, 5k, 10k, 19k);
//! - `fanout-cost.svg`: paced fan-out (`--rate`/s for `--secs`), server CPU per delivery and p99
//!   delivery latency against subscribers (`--subs`, default 1k, 2.5k, 5k, 10k), on a log scale;
//!   with `--nodes N`, one more point: `cluster-fanout` (N nodes x `--per-node` subscribers of
//!   one topic on `--engine`, 1 broadcast/s for 10 s), the nodes' CPU summed;
//! - `latency.svg`: the distribution of delivery latency at the largest subscriber count
//!   (quantiles 1 % … 99.9 %).
//!
//! Every point is a fresh server of each kind (firebrand's conformance app, the baseline
//! broadcaster). `--out DIR` (default `crates/firebrand-bench/charts`).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use plotters::prelude::*;

use crate::stats::{Hist, rss_kib};
use crate::{Opts, Subs, each, paced, settle};

/// One series per kind: firebrand, baseline, a firebrand cluster.
type Series = [Vec<(f64, f64)>; 3];

const FIREBRAND: RGBColor = RGBColor(0xd9, 0x48, 0x1f);
const BASELINE: RGBColor = RGBColor(0x4a, 0x6f, 0xa5);
const CLUSTER: RGBColor = RGBColor(0x2e, 0x8b, 0x57);

pub(crate) async fn charts(o: &Opts) -> anyhow::Result<()> {
    let out = o
        .out
        .clone()
        .unwrap_or_else(|| "crates/firebrand-bench/charts".into());
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let conns = o
        .conns_list
        .clone()
        .unwrap_or_else(|| vec![1000, 5000, 10_000, 19_000]);
    let subs = o
        .subs
        .clone()
        .unwrap_or_else(|| vec![1000, 2500, 5000, 10_000]);

    let mut rss: Series = Default::default();
    for &n in &conns {
        let (fb, base) = each(o, |server| async move {
            let before = rss_kib(server.pid);
            let s = Subs::spawn(server.addr, n, |i| format!("room:idle{}", i % 100), o);
            let (joined, _) = s.wait_joined(Instant::now()).await?;
            tokio::time::sleep(Duration::from_secs(3)).await;
            let after = rss_kib(server.pid);
            drop(s);
            settle().await;
            Ok(Some(
                (after.saturating_sub(before) * 1024) as f64 / joined as f64,
            ))
        })
        .await?;
        push(&mut rss, n as f64, fb, base);
        println!("  idle {n}: firebrand {fb:?} B/conn, baseline {base:?} B/conn");
    }

    let (mut cpu, mut p99): (Series, Series) = Default::default();
    let mut hists: [Hist; 2] = Default::default();
    for (i, &n) in subs.iter().enumerate() {
        let last = i + 1 == subs.len();
        let (fb, base) = each(o, |server| async move {
            let topic = "room:charts";
            let s = Subs::spawn(server.addr, n, |_| topic.to_string(), o);
            s.wait_joined(Instant::now()).await?;
            let (got, _, _, cpu, hist) = paced(&s, &server, topic, o).await?;
            drop(s);
            settle().await;
            let per = cpu as f64 / got as f64;
            Ok(Some((per, hist.quantile(0.99) as f64 / 1000.0, hist)))
        })
        .await?;
        let split = |r: &Option<(f64, f64, Hist)>| r.as_ref().map(|(c, p, _)| (*c, *p));
        push(
            &mut cpu,
            n as f64,
            split(&fb).map(|x| x.0),
            split(&base).map(|x| x.0),
        );
        push(
            &mut p99,
            n as f64,
            split(&fb).map(|x| x.1),
            split(&base).map(|x| x.1),
        );
        println!(
            "  paced {n}: firebrand {:?} (ns/delivery, p99 ms), baseline {:?}",
            split(&fb),
            split(&base)
        );
        if last {
            hists = [
                fb.map(|r| r.2).unwrap_or_default(),
                base.map(|r| r.2).unwrap_or_default(),
            ];
        }
    }

    let mut cluster_label = String::new();
    if let Some(nodes) = o.nodes {
        // The cluster scenario's own pacing: 1 broadcast/s for 10 s.
        let c = cluster_opts(o);
        let r = crate::scenarios::cluster_fanout(&c).await?;
        let x = r.subscribers as f64;
        cpu[2].push((x, r.server_cpu_per_delivery_ns));
        p99[2].push((x, r.p99_ms));
        cluster_label = format!("firebrand, {nodes} nodes on {}, 1/s", o.engine.name());
        println!(
            "  cluster {x}: {:.0} ns/delivery (all nodes), p99 {:.1} ms",
            r.server_cpu_per_delivery_ns, r.p99_ms
        );
    }

    let rss_svg = out.join("idle-rss.svg");
    line_chart(
        &rss_svg,
        "Server RSS per idle joined connection",
        "connections",
        "bytes per connection",
        &rss,
        "",
    )?;
    let cpu_svg = out.join("fanout-cost.svg");
    two_charts(
        &cpu_svg,
        &format!("Paced fan-out, {}/s for {} s", o.rate(), o.secs()),
        ("server CPU per delivery (ns)", &cpu),
        ("p99 delivery latency (ms)", &p99),
        &cluster_label,
    )?;
    let quantiles: Vec<f64> = vec![0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999];
    let dist: Series = [0, 1, 2].map(|k| {
        let Some(h) = hists.get(k).filter(|h| h.count() > 0) else {
            return Vec::new();
        };
        quantiles
            .iter()
            .map(|&q| (h.quantile(q) as f64 / 1000.0, q * 100.0))
            .collect()
    });
    let lat_svg = out.join("latency.svg");
    line_chart(
        &lat_svg,
        &format!(
            "Delivery latency, {} subscribers, {}/s",
            subs.last().copied().unwrap_or(0),
            o.rate()
        ),
        "latency (ms)",
        "% of deliveries at or below",
        &dist,
        "",
    )?;
    println!("\n== charts");
    for (name, s) in [
        ("idle RSS B/conn", &rss),
        ("paced CPU ns/delivery", &cpu),
        ("paced p99 ms", &p99),
    ] {
        println!(
            "{name}: firebrand {:?}; baseline {:?}; cluster {:?}",
            s[0], s[1], s[2]
        );
    }
    println!(
        "SUMMARY charts: wrote {}, {}, {}",
        rss_svg.display(),
        cpu_svg.display(),
        lat_svg.display()
    );
    Ok(())
}

/// `o` for the cluster point: the cluster scenario's own pacing, 1 broadcast/s for 10 s
/// (`--rate` and `--secs` pace the single-node points).
fn cluster_opts(o: &Opts) -> Opts {
    let mut c = o.clone();
    c.rate = Some(1);
    c.secs = Some(10);
    c
}

fn push<T: Into<Option<f64>>>(s: &mut Series, x: f64, fb: T, base: T) {
    for (k, y) in [fb.into(), base.into()].into_iter().enumerate() {
        if let Some(y) = y.filter(|y| y.is_finite()) {
            s[k].push((x, y));
        }
    }
}

fn range(s: &Series, f: impl Fn(&(f64, f64)) -> f64) -> (f64, f64) {
    let all = s.iter().flatten().map(f);
    let max = all.fold(0f64, f64::max);
    (0.0, if max > 0.0 { max * 1.1 } else { 1.0 })
}

/// The x range of a log axis: a little beyond the smallest and largest x.
fn log_range(s: &Series) -> std::ops::Range<f64> {
    let xs = s.iter().flatten().map(|p| p.0).filter(|x| *x > 0.0);
    let (lo, hi) = xs.fold((f64::MAX, 0f64), |(lo, hi), x| (lo.min(x), hi.max(x)));
    if hi == 0.0 {
        return 1.0..10.0;
    }
    lo / 1.3..hi * 1.3
}

/// Draws the series; `cluster` names the third (one point, no line), if any. The x axis is
/// logarithmic when the cluster point is there (95k beside 1k–10k).
fn draw(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    title: &str,
    (x_label, y_label): (&str, &str),
    s: &Series,
    cluster: &str,
) -> anyhow::Result<()> {
    let (y0, y1) = range(s, |p| p.1);
    let mut builder = ChartBuilder::on(area);
    builder
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60);
    let labels = (x_label, y_label);
    if s[2].is_empty() {
        let (x0, x1) = range(s, |p| p.0);
        let chart = builder.build_cartesian_2d(x0..x1, y0..y1);
        plot(
            chart.map_err(|e| anyhow::anyhow!("{e}"))?,
            labels,
            s,
            cluster,
        )
    } else {
        let chart = builder.build_cartesian_2d(log_range(s).log_scale(), y0..y1);
        plot(
            chart.map_err(|e| anyhow::anyhow!("{e}"))?,
            labels,
            s,
            cluster,
        )
    }
}

fn plot<'a, X>(
    mut chart: ChartContext<
        'a,
        SVGBackend<'a>,
        Cartesian2d<X, plotters::coord::types::RangedCoordf64>,
    >,
    (x_label, y_label): (&str, &str),
    s: &Series,
    cluster: &str,
) -> anyhow::Result<()>
where
    X: Ranged<ValueType = f64> + plotters::coord::ranged1d::ValueFormatter<f64>,
{
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    for (k, (name, color)) in [
        ("firebrand", FIREBRAND),
        ("baseline (raw frames)", BASELINE),
        (cluster, CLUSTER),
    ]
    .into_iter()
    .enumerate()
    {
        if s[k].is_empty() {
            continue;
        }
        chart
            .draw_series(LineSeries::new(s[k].iter().copied(), color.stroke_width(2)))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label(name)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], color.stroke_width(2)));
        chart
            .draw_series(s[k].iter().map(|&p| Circle::new(p, 3, color.filled())))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

fn line_chart(
    path: &Path,
    title: &str,
    x: &str,
    y: &str,
    s: &Series,
    cluster: &str,
) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (720, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    draw(&root, title, (x, y), s, cluster)?;
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

fn two_charts(
    path: &Path,
    title: &str,
    left: (&str, &Series),
    right: (&str, &Series),
    cluster: &str,
) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (1100, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let (a, b) = root.split_horizontally(550);
    draw(
        &a,
        &format!("{title}: {}", left.0),
        ("subscribers", left.0),
        left.1,
        cluster,
    )?;
    draw(
        &b,
        &format!("{title}: {}", right.0),
        ("subscribers", right.0),
        right.1,
        cluster,
    )?;
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}
