//! Command-line helpers shared by the `jetq` command and `jetq-demo-worker`:
//! value parsers that refuse out-of-range numbers with one clear line,
//! argument parsing that reports such a refusal on one line, and escaping of
//! text from the wire before it reaches a terminal.

pub mod args;
pub mod display;
