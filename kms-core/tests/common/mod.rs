//! Reading the known-answer files under `tests/data/`.
//!
//! A file holds one vector per block, blocks separated by blank lines. A line is `name = value`;
//! a line that starts with white space continues the value above it; `#` starts a comment line.

use std::collections::BTreeMap;
use std::path::PathBuf;

/// One vector: its fields, and where it starts, for messages.
pub struct Vector {
    pub at: String,
    fields: BTreeMap<String, String>,
}

impl Vector {
    /// A field's value as written.
    pub fn get(&self, name: &str) -> &str {
        self.fields
            .get(name)
            .unwrap_or_else(|| panic!("{}: no field `{name}`", self.at))
    }

    /// A hex field, white space ignored.
    pub fn hex(&self, name: &str) -> Vec<u8> {
        let digits: String = self.get(name).split_whitespace().collect();
        hex::decode(&digits).unwrap_or_else(|e| panic!("{}: field `{name}`: {e}", self.at))
    }
}

/// Every vector of `tests/data/<file>`.
pub fn vectors(file: &str) -> Vec<Vector> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(file);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));

    let mut out = Vec::new();
    let mut current: Option<Vector> = None;
    let mut last_field = String::new();
    for (n, line) in text.lines().enumerate() {
        let at = format!("{file}:{}", n + 1);
        if line.trim().is_empty() {
            out.extend(current.take());
            continue;
        }
        if line.trim_start().starts_with('#') {
            continue;
        }
        let vector = current.get_or_insert_with(|| Vector {
            at: at.clone(),
            fields: BTreeMap::new(),
        });
        if line.starts_with(char::is_whitespace) {
            let value = vector
                .fields
                .get_mut(&last_field)
                .unwrap_or_else(|| panic!("{at}: a continuation line without a field"));
            value.push(' ');
            value.push_str(line.trim());
            continue;
        }
        let (name, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("{at}: expected `name = value`"));
        last_field = name.trim().to_string();
        let previous = vector
            .fields
            .insert(last_field.clone(), value.trim().to_string());
        assert!(previous.is_none(), "{at}: field `{last_field}` given twice");
    }
    out.extend(current);
    out
}
