//! Value parsers for command-line flags, and parsing that reports a refused
//! value on one line.
//!
//! Every seconds-valued flag of `jetq` and `jetq-demo-worker` goes through
//! [`seconds`], so NaN, infinity, negative and too large values are refused
//! by clap (exit code 2) instead of reaching code that would panic on them.
//!
//! ```
//! use std::time::Duration;
//! use clap::Parser;
//!
//! #[derive(Parser)]
//! struct Opts {
//!     #[arg(long, value_parser = jetq_cli::args::seconds(Duration::ZERO, jetq_cli::args::DAY))]
//!     wait: Option<Duration>,
//! }
//!
//! let opts = Opts::try_parse_from(["x", "--wait", "1.5"]).unwrap();
//! assert_eq!(opts.wait, Some(Duration::from_millis(1500)));
//! assert!(Opts::try_parse_from(["x", "--wait", "1e20"]).is_err());
//! assert!(Opts::try_parse_from(["x", "--wait", "NaN"]).is_err());
//! assert!(Opts::try_parse_from(["x", "--wait", "-1"]).is_err());
//! ```

use std::ffi::OsString;
use std::time::Duration;

use clap::builder::TypedValueParser;
use clap::error::ErrorKind;

use crate::display::escape;

/// One day: the bound of the worker's ack wait, shutdown timeout and connect wait.
pub const DAY: Duration = Duration::from_secs(24 * 3600);

/// The longest `--wait` of the `jetq` command: 365 days.
pub const MAX_WAIT: Duration = Duration::from_secs(365 * 24 * 3600);

/// The shortest ack wait a worker accepts (what the worker builder allows).
pub const MIN_ACK_WAIT: Duration = Duration::from_millis(300);

/// A parser of a number of seconds (`30`, `1.5`, `1e3`) into a [`Duration`]
/// from `min` to `max`, both included. NaN, infinity, negative numbers and
/// numbers outside the range are refused with a message clap puts after
/// the flag's name.
pub fn seconds(min: Duration, max: Duration) -> impl TypedValueParser<Value = Duration> {
    move |text: &str| parse_seconds(text, min, max)
}

/// The check behind [`seconds`]: the duration, or why `text` is refused.
pub fn parse_seconds(text: &str, min: Duration, max: Duration) -> Result<Duration, String> {
    let value: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("not a number of seconds; {}", range(min, max)))?;
    if value.is_nan() {
        return Err(format!("not a number of seconds; {}", range(min, max)));
    }
    if value.is_infinite() {
        return Err(format!(
            "must be a finite number of seconds; {}",
            range(min, max)
        ));
    }
    if value < 0.0 {
        return Err(format!("must not be negative; {}", range(min, max)));
    }
    if value > max.as_secs_f64() {
        return Err(format!("too large; {}", range(min, max)));
    }
    if value < min.as_secs_f64() {
        return Err(format!("too small; {}", range(min, max)));
    }
    // In range, so representable; clamp anyway against rounding at the edges.
    Ok(Duration::try_from_secs_f64(value)
        .unwrap_or(max)
        .clamp(min, max))
}

/// "use 0 to 86400 seconds (1 day)".
fn range(min: Duration, max: Duration) -> String {
    format!(
        "use {} to {} seconds{}",
        min.as_secs_f64(),
        max.as_secs_f64(),
        in_days(max)
    )
}

/// " (N days)" for a whole number of days, else nothing.
fn in_days(d: Duration) -> String {
    let day = DAY.as_secs();
    match d.as_secs() / day {
        0 => String::new(),
        1 if d.as_secs() == day => " (1 day)".to_owned(),
        n if d.as_secs() == n * day && d.subsec_nanos() == 0 => format!(" ({n} days)"),
        _ => String::new(),
    }
}

/// A parser of `--max-retries`: a whole number from 0 to
/// [`jetq::request::MAX_RETRIES_LIMIT`].
pub fn max_retries() -> impl TypedValueParser<Value = u32> {
    move |text: &str| parse_max_retries(text)
}

/// The check behind [`max_retries`].
pub fn parse_max_retries(text: &str) -> Result<u32, String> {
    let limit = jetq::request::MAX_RETRIES_LIMIT;
    match text.trim().parse::<u128>() {
        Ok(n) if n <= u128::from(limit) => u32::try_from(n).map_err(|e| e.to_string()),
        Ok(_) => Err(format!(
            "too many retries; use 0 to {limit} (jetq's limit on retries)"
        )),
        Err(_) => Err(format!("not a whole number of retries; use 0 to {limit}")),
    }
}

/// Parse the command line of `program`; see [`parse_from`].
pub fn parse<P: clap::Parser>(program: &str) -> P {
    parse_from(program, std::env::args_os())
}

/// Parse `args` (the program name first). A refused value is reported on
/// one line on stderr (`PROGRAM: invalid value '1e20' for '--ack-wait
/// <SECONDS>': too large; …`) and the process exits with code 2; other
/// usage errors, `--help` and `--version` behave as clap makes them.
pub fn parse_from<P, I, T>(program: &str, args: I) -> P
where
    P: clap::Parser,
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    match P::try_parse_from(args) {
        Ok(parsed) => parsed,
        Err(err) => match one_line_error(program, &err) {
            Some(line) => {
                eprintln!("{line}");
                std::process::exit(2)
            }
            None => err.exit(),
        },
    }
}

/// The one-line report of a refused value, or `None` for other errors
/// (which clap reports with their usage).
pub fn one_line_error(program: &str, err: &clap::Error) -> Option<String> {
    if !matches!(
        err.kind(),
        ErrorKind::ValueValidation | ErrorKind::InvalidValue
    ) {
        return None;
    }
    let rendered = err.render().to_string();
    let first = rendered.lines().find(|l| !l.trim().is_empty())?;
    let text = first.strip_prefix("error: ").unwrap_or(first);
    Some(format!("{program}: {}", escape(text)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn seconds_in_range() {
        let day = DAY;
        assert_eq!(
            parse_seconds("0", Duration::ZERO, day).unwrap(),
            Duration::ZERO
        );
        assert_eq!(
            parse_seconds(" 1.5 ", Duration::ZERO, day).unwrap(),
            Duration::from_millis(1500)
        );
        assert_eq!(parse_seconds("86400", Duration::ZERO, day).unwrap(), day);
        assert_eq!(
            parse_seconds("0.3", MIN_ACK_WAIT, day).unwrap(),
            MIN_ACK_WAIT
        );
    }

    #[test]
    fn seconds_refused() {
        let day = DAY;
        for bad in [
            "NaN", "nan", "inf", "-inf", "infinity", "-1", "-0.5", "1e20", "86400.5", "x", "",
            "1e400",
        ] {
            let err = parse_seconds(bad, Duration::ZERO, day).unwrap_err();
            assert!(
                err.contains("use 0 to 86400 seconds (1 day)"),
                "{bad}: {err}"
            );
        }
        assert!(parse_seconds("0.1", MIN_ACK_WAIT, day)
            .unwrap_err()
            .starts_with("too small"));
        let max = jetq::request::MAX_DELAY;
        assert!(parse_seconds("1e12", Duration::ZERO, max).is_err());
        assert_eq!(
            parse_seconds(&max.as_secs().to_string(), Duration::ZERO, max).unwrap(),
            max
        );
    }

    #[test]
    fn retries() {
        assert_eq!(parse_max_retries("0").unwrap(), 0);
        assert_eq!(parse_max_retries("10000").unwrap(), 10_000);
        for bad in [
            "10001",
            "4294967295",
            "99999999999999999999999",
            "-1",
            "x",
            "1.5",
        ] {
            let err = parse_max_retries(bad).unwrap_err();
            assert!(err.contains("0 to 10000"), "{bad}: {err}");
        }
    }

    #[derive(Debug, clap::Parser)]
    struct Opts {
        #[arg(long, value_name = "SECONDS", value_parser = seconds(Duration::ZERO, DAY))]
        wait: Option<Duration>,
        #[arg(long)]
        name: String,
    }

    #[test]
    fn a_refused_value_is_one_line_naming_the_flag() {
        use clap::Parser;
        let err = Opts::try_parse_from(["prog", "--name", "n", "--wait", "1e20"]).unwrap_err();
        let line = one_line_error("prog", &err).unwrap();
        assert!(!line.contains('\n'), "{line}");
        assert!(
            line.starts_with("prog: invalid value '1e20' for '--wait <SECONDS>'"),
            "{line}"
        );
        assert!(line.contains("too large"), "{line}");
        // A missing argument keeps clap's own report with its usage.
        let err = Opts::try_parse_from(["prog"]).unwrap_err();
        assert!(one_line_error("prog", &err).is_none());
    }
}
