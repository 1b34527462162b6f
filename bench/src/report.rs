//! The output: one JSON object per benchmark, or a table.

use std::fmt::Write as _;

use serde_json::Value;

use crate::stats::{Figures, Summary};
use crate::{Bench, Opts};

/// How a figure is shown.
#[derive(Debug, Clone, Copy)]
enum Unit {
    /// Tasks per second.
    Rate,
    /// jetq over raw.
    Ratio,
    /// Microseconds of latency.
    Micros,
    /// CPU microseconds per task.
    Cpu,
    /// Messages per task.
    Msgs,
    /// Mebibytes.
    Mib,
}

impl Unit {
    fn decimals(self) -> i32 {
        match self {
            Unit::Rate | Unit::Micros => 0,
            Unit::Ratio => 3,
            Unit::Cpu | Unit::Mib => 1,
            Unit::Msgs => 2,
        }
    }
}

/// One figure of a benchmark.
#[derive(Debug)]
struct Row {
    /// Its key in the JSON line.
    json: String,
    /// Its label in the table.
    label: String,
    unit: Unit,
    summary: Option<Summary>,
}

/// One benchmark's figures.
#[derive(Debug)]
pub(crate) struct Line {
    bench: &'static str,
    title: String,
    rows: Vec<Row>,
    /// Settings of the benchmark, printed as they are.
    settings: Vec<(&'static str, Value)>,
}

struct Builder<'a> {
    figures: &'a Figures,
    rows: Vec<Row>,
}

impl Builder<'_> {
    fn row(&mut self, json: &str, figure: &str, label: impl Into<String>, unit: Unit) {
        self.rows.push(Row {
            json: json.to_owned(),
            label: label.into(),
            unit,
            summary: self.figures.get(figure),
        });
    }

    /// A row whose JSON key is its figure's name.
    fn same(&mut self, name: &str, label: impl Into<String>, unit: Unit) {
        self.row(name, name, label, unit);
    }

    fn take(&mut self) -> Vec<Row> {
        std::mem::take(&mut self.rows)
    }
}

/// The lines of the benchmarks that ran.
pub(crate) fn lines(opts: &Opts, figures: &Figures, ran: &dyn Fn(Bench) -> bool) -> Vec<Line> {
    let c = opts.concurrency;
    let rc = opts.raw_concurrency();
    let hc = opts.high_concurrency;
    let mut b = Builder {
        figures,
        rows: Vec::new(),
    };
    let mut lines = Vec::new();
    if ran(Bench::Throughput) {
        b.same(
            "raw_tasks_per_s",
            format!("raw async-nats, c={rc}, tasks/s"),
            Unit::Rate,
        );
        b.same(
            "jetq_tasks_per_s",
            format!("jetq, c={c}, tasks/s"),
            Unit::Rate,
        );
        b.same("ratio", "jetq / raw", Unit::Ratio);
        b.same(
            "jetq_high_concurrency_tasks_per_s",
            format!("jetq, c={hc}, tasks/s"),
            Unit::Rate,
        );
        b.same(
            "high_concurrency_ratio",
            format!("jetq c={hc} / raw"),
            Unit::Ratio,
        );
        b.same(
            "jetq_middleware_tasks_per_s",
            format!("jetq, c={c}, metrics + tracing middleware, tasks/s"),
            Unit::Rate,
        );
        b.same(
            "middleware_ratio",
            "jetq with middleware / raw",
            Unit::Ratio,
        );
        for (name, who) in [
            ("raw", "raw".to_owned()),
            ("jetq", format!("jetq c={c}")),
            ("jetq_high_concurrency", format!("jetq c={hc}")),
        ] {
            cpu_rows(&mut b, name, name, &who);
        }
        lines.push(Line {
            bench: "throughput",
            title: format!(
                "Throughput: {} tasks, every result read back by the producer",
                opts.tasks
            ),
            rows: b.take(),
            settings: vec![
                ("tasks", opts.tasks.into()),
                ("concurrency", c.into()),
                ("raw_concurrency", rc.into()),
                ("high_concurrency", hc.into()),
            ],
        });
    }
    if ran(Bench::FireAndForget) {
        b.row(
            "raw_tasks_per_s",
            "ff_raw_tasks_per_s",
            format!("raw publish + pull + ack, c={rc}, tasks/s"),
            Unit::Rate,
        );
        b.row(
            "jetq_tasks_per_s",
            "ff_jetq_tasks_per_s",
            format!("jetq, c={c}, ignore_result, tasks/s"),
            Unit::Rate,
        );
        b.row("ratio", "ff_ratio", "jetq / raw", Unit::Ratio);
        b.row(
            "jetq_recorded_tasks_per_s",
            "ff_jetq_recorded_tasks_per_s",
            format!("jetq, c={c}, every record written, tasks/s"),
            Unit::Rate,
        );
        b.row(
            "recorded_ratio",
            "ff_recorded_ratio",
            "jetq with records / raw",
            Unit::Ratio,
        );
        cpu_rows(&mut b, "raw", "raw_ff", "raw");
        cpu_rows(&mut b, "jetq", "jetq_ff", "jetq");
        cpu_rows(
            &mut b,
            "jetq_recorded",
            "jetq_ff_recorded",
            "jetq with records",
        );
        lines.push(Line {
            bench: "fire_and_forget",
            title: format!("Fire and forget: {} tasks, results not read", opts.tasks),
            rows: b.take(),
            settings: vec![
                ("tasks", opts.tasks.into()),
                ("concurrency", c.into()),
                ("raw_concurrency", rc.into()),
            ],
        });
    }
    if ran(Bench::Latency) {
        b.same("raw_p50_us", "raw p50, µs", Unit::Micros);
        b.same("jetq_p50_us", "jetq p50, µs", Unit::Micros);
        b.same("jetq_p99_us", "jetq p99, µs", Unit::Micros);
        b.same("raw_p99_us", "raw p99, µs", Unit::Micros);
        b.same("p50_ratio", "jetq p50 / raw p50", Unit::Ratio);
        b.same(
            "jetq_unchecked_p50_us",
            "jetq start_unchecked p50, µs",
            Unit::Micros,
        );
        b.same(
            "jetq_unchecked_p99_us",
            "jetq start_unchecked p99, µs",
            Unit::Micros,
        );
        b.same(
            "unchecked_p50_ratio",
            "jetq start_unchecked p50 / raw p50",
            Unit::Ratio,
        );
        let mut settings = vec![("requests", opts.latency_requests.into())];
        if opts.rate > 0.0 && opts.rate_seconds > 0.0 {
            let r = opts.rate;
            b.same(
                "raw_rate_p50_us",
                format!("at {r}/s: raw p50, µs"),
                Unit::Micros,
            );
            b.same(
                "raw_rate_p99_us",
                format!("at {r}/s: raw p99, µs"),
                Unit::Micros,
            );
            b.same(
                "jetq_rate_p50_us",
                format!("at {r}/s: jetq p50, µs"),
                Unit::Micros,
            );
            b.same(
                "jetq_rate_p99_us",
                format!("at {r}/s: jetq p99, µs"),
                Unit::Micros,
            );
            settings.push(("rate_per_s", r.into()));
            settings.push(("rate_seconds", opts.rate_seconds.into()));
        }
        lines.push(Line {
            bench: "latency",
            title: format!(
                "Latency, publish → result seen by the producer ({} requests one at a time{})",
                opts.latency_requests,
                if opts.rate > 0.0 && opts.rate_seconds > 0.0 {
                    format!("; then {}/s for {} s", opts.rate, opts.rate_seconds)
                } else {
                    String::new()
                }
            ),
            rows: b.take(),
            settings,
        });
    }
    if ran(Bench::Memory) {
        b.same(
            "worker_peak_rss_mb",
            "worker process peak RSS (VmHWM), MiB",
            Unit::Mib,
        );
        b.same(
            "drain_tasks_per_s",
            "its drain rate from process start, tasks/s",
            Unit::Rate,
        );
        lines.push(Line {
            bench: "memory",
            title: format!(
                "Memory: a jetq worker process, c={c}, draining {} queued requests",
                opts.memory_tasks
            ),
            rows: b.take(),
            settings: vec![
                ("tasks", opts.memory_tasks.into()),
                ("concurrency", c.into()),
            ],
        });
    }
    if ran(Bench::Throughput) || ran(Bench::FireAndForget) {
        let mut runs: Vec<(&str, String)> = Vec::new();
        if ran(Bench::Throughput) {
            runs.push(("raw", "raw".to_owned()));
            runs.push(("jetq", format!("jetq c={c}")));
            runs.push(("jetq_high_concurrency", format!("jetq c={hc}")));
        }
        if ran(Bench::FireAndForget) {
            runs.push(("raw_ff", "raw fire-and-forget".to_owned()));
            runs.push(("jetq_ff", "jetq fire-and-forget".to_owned()));
            runs.push((
                "jetq_ff_recorded",
                "jetq fire-and-forget with records".to_owned(),
            ));
        }
        for (name, who) in runs {
            b.same(
                &format!("{name}_msgs_per_task"),
                format!("{who} protocol messages/task"),
                Unit::Msgs,
            );
            b.same(
                &format!("{name}_producer_msgs_per_task"),
                format!("{who} protocol messages/task, producer"),
                Unit::Msgs,
            );
            b.same(
                &format!("{name}_worker_msgs_per_task"),
                format!("{who} protocol messages/task, worker"),
                Unit::Msgs,
            );
            b.same(
                &format!("{name}_stored_per_task"),
                format!("{who} stored messages/task"),
                Unit::Msgs,
            );
        }
        lines.push(Line {
            bench: "ops",
            title: "Server work per task (producer + worker connections; messages written to the streams)".to_owned(),
            rows: b.take(),
            settings: Vec::new(),
        });
    }
    lines
}

/// CPU rows of run `figure_name`, under JSON keys starting `json_name`.
fn cpu_rows(b: &mut Builder<'_>, json_name: &str, figure_name: &str, who: &str) {
    b.row(
        &format!("{json_name}_cpu_us_per_task"),
        &format!("{figure_name}_cpu_us_per_task"),
        format!("{who}: CPU µs/task, producer + worker process"),
        Unit::Cpu,
    );
    b.row(
        &format!("{json_name}_server_cpu_us_per_task"),
        &format!("{figure_name}_server_cpu_us_per_task"),
        format!("{who}: CPU µs/task, nats-server"),
        Unit::Cpu,
    );
}

/// `v` rounded for its unit, as JSON (an integer when no decimals are kept).
fn number(v: f64, unit: Unit) -> Value {
    let d = unit.decimals();
    if d == 0 {
        Value::from(v.round() as i64)
    } else {
        let f = 10f64.powi(d);
        Value::from((v * f).round() / f)
    }
}

impl Line {
    /// The line as one JSON object: each figure's median under its key,
    /// min and max under `{key}_min` and `{key}_max`.
    pub(crate) fn json(&self) -> String {
        let mut fields: Vec<(String, Value)> = vec![("bench".to_owned(), self.bench.into())];
        for row in &self.rows {
            let (median, min, max) = match row.summary {
                Some(s) => (
                    number(s.median, row.unit),
                    number(s.min, row.unit),
                    number(s.max, row.unit),
                ),
                None => (Value::Null, Value::Null, Value::Null),
            };
            fields.push((row.json.to_owned(), median));
            fields.push((format!("{}_min", row.json), min));
            fields.push((format!("{}_max", row.json), max));
        }
        for (k, v) in &self.settings {
            fields.push(((*k).to_owned(), v.clone()));
        }
        fields.push(("allocator".to_owned(), ALLOCATOR.into()));
        let body: Vec<String> = fields
            .iter()
            .map(|(k, v)| format!("{}:{v}", Value::from(k.as_str())))
            .collect();
        format!("{{{}}}", body.join(","))
    }
}

/// `v` for the table: rounded, with thousands separators.
fn human(v: f64, unit: Unit) -> String {
    let d = unit.decimals();
    let text = format!("{:.*}", d.max(0) as usize, v);
    let (int, frac) = match text.split_once('.') {
        Some((i, f)) => (i.to_owned(), format!(".{f}")),
        None => (text.clone(), String::new()),
    };
    let (sign, digits) = match int.strip_prefix('-') {
        Some(rest) => ("-", rest),
        None => ("", int.as_str()),
    };
    let mut grouped = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(ch);
    }
    format!("{sign}{grouped}{frac}")
}

/// The global allocator of this build (`--features mimalloc`).
pub(crate) const ALLOCATOR: &str = if cfg!(feature = "mimalloc") {
    "mimalloc"
} else {
    "system"
};

/// The lines as a table.
pub(crate) fn table(lines: &[Line], server_version: &str, tasks: u64, rounds: u64) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "jetq-bench: nats-server {server_version}, {tasks} tasks, {rounds} round{}, {ALLOCATOR} allocator; median [min – max] of the rounds",
        if rounds == 1 { "" } else { "s" }
    );
    let width = lines
        .iter()
        .flat_map(|l| l.rows.iter().map(|r| r.label.chars().count()))
        .max()
        .unwrap_or(0);
    for line in lines {
        let _ = writeln!(out, "\n{}", line.title);
        for row in &line.rows {
            let pad = width.saturating_sub(row.label.chars().count());
            let value = match row.summary {
                Some(s) => format!(
                    "{:>10}   [{} – {}]",
                    human(s.median, row.unit),
                    human(s.min, row.unit),
                    human(s.max, row.unit)
                ),
                None => format!("{:>10}", "n/a"),
            };
            let _ = writeln!(out, "  {}{}  {value}", row.label, " ".repeat(pad));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers() {
        assert_eq!(human(41532.4, Unit::Rate), "41,532");
        assert_eq!(human(999.0, Unit::Rate), "999");
        assert_eq!(human(1234567.0, Unit::Micros), "1,234,567");
        assert_eq!(human(0.1134, Unit::Ratio), "0.113");
        assert_eq!(number(41532.6, Unit::Rate), Value::from(41533));
        assert_eq!(number(0.11349, Unit::Ratio), Value::from(0.113));
    }

    #[test]
    fn json_line_shape() {
        let mut figures = Figures::default();
        figures.push("raw_p50_us", Some(400.0));
        let line = Line {
            bench: "latency",
            title: String::new(),
            rows: vec![Row {
                json: "raw_p50_us".to_owned(),
                label: String::new(),
                unit: Unit::Micros,
                summary: figures.get("raw_p50_us"),
            }],
            settings: vec![("requests", 300.into())],
        };
        assert_eq!(
            line.json(),
            format!(
                r#"{{"bench":"latency","raw_p50_us":400,"raw_p50_us_min":400,"raw_p50_us_max":400,"requests":300,"allocator":"{ALLOCATOR}"}}"#
            )
        );
    }
}
