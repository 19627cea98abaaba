//! The table the benchmark prints: one row per figure, with its reference, ratio and bar.

use std::fmt::Write as _;

/// Whether a figure meets its bar.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Met,
    Missed,
    /// A figure without a bar, shown for context.
    Info,
}

/// One row of the table.
pub struct Row {
    measure: String,
    kms: String,
    reference: String,
    ratio: String,
    bar: String,
    verdict: Verdict,
}

impl Row {
    /// A row showing `kms` for `measure`, without reference or bar yet.
    pub fn new(measure: impl Into<String>, kms: impl Into<String>) -> Row {
        Row {
            measure: measure.into(),
            kms: kms.into(),
            reference: "-".into(),
            ratio: "-".into(),
            bar: "-".into(),
            verdict: Verdict::Info,
        }
    }

    /// The figure kms is compared with, and the ratio kms / reference.
    pub fn against(mut self, reference: impl Into<String>, ratio: Option<f64>) -> Row {
        self.reference = reference.into();
        self.ratio = ratio.map_or("n/a".into(), |r| format!("{r:.2}x"));
        self
    }

    /// The bar and whether it is met.
    pub fn bar(mut self, bar: impl Into<String>, met: bool) -> Row {
        self.bar = bar.into();
        self.verdict = if met { Verdict::Met } else { Verdict::Missed };
        self
    }
}

/// The rows and notes of one run.
#[derive(Default)]
pub struct Table {
    rows: Vec<Row>,
    notes: Vec<String>,
}

impl Table {
    pub fn push(&mut self, row: Row) {
        self.rows.push(row);
    }

    /// A line printed under the table: how a figure was obtained.
    pub fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }

    /// Whether any bar was missed.
    pub fn any_missed(&self) -> bool {
        self.rows.iter().any(|r| r.verdict == Verdict::Missed)
    }

    /// The table as Markdown, columns aligned.
    pub fn render(&self) -> String {
        let header = ["Measure", "kms", "Reference", "Ratio", "Bar", "Met"];
        let cells: Vec<[String; 6]> = self
            .rows
            .iter()
            .map(|r| {
                let verdict = match r.verdict {
                    Verdict::Met => "yes",
                    Verdict::Missed => "NO",
                    Verdict::Info => "-",
                };
                [
                    r.measure.clone(),
                    r.kms.clone(),
                    r.reference.clone(),
                    r.ratio.clone(),
                    r.bar.clone(),
                    verdict.to_string(),
                ]
            })
            .collect();
        let mut widths = header.map(|h| h.chars().count());
        for row in &cells {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }

        let mut out = String::new();
        let line = |out: &mut String, row: &[String]| {
            let padded: Vec<String> = row
                .iter()
                .zip(&widths)
                .map(|(cell, w)| format!("{cell:<w$}"))
                .collect();
            let _ = writeln!(out, "| {} |", padded.join(" | "));
        };
        line(&mut out, &header.map(String::from));
        let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
        let _ = writeln!(out, "|-{}-|", rule.join("-|-"));
        for row in &cells {
            line(&mut out, row);
        }
        for note in &self.notes {
            let _ = writeln!(out, "\n- {note}");
        }
        out
    }
}

/// Operations per second, e.g. `1.52 M/s`.
pub fn per_second(rate: f64) -> String {
    if rate >= 1e6 {
        format!("{:.2} M/s", rate / 1e6)
    } else if rate >= 1e3 {
        format!("{:.1} k/s", rate / 1e3)
    } else {
        format!("{rate:.0} /s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_aligned_markdown() {
        let mut table = Table::default();
        table.push(Row::new("wrap", per_second(1_520_000.0)).against("1", Some(5.0)));
        table.push(Row::new("open", "12 ms").bar("< 200 ms", true));
        table.note("measured here");
        let text = table.render();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0].len(), lines[2].len());
        assert!(lines[2].contains("1.52 M/s") && lines[2].contains("5.00x"));
        assert!(lines[3].contains("yes"));
        assert!(text.contains("- measured here"));
        assert!(!table.any_missed());
    }
}
