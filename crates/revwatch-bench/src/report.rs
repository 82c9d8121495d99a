//! The report every suite produces: named figures, printed as a table and as JSON
//! `{"suite": NAME, "figures": {NAME: NUMBER, ...}}`.

use std::{collections::BTreeMap, path::Path};

use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct Report {
    pub suite: String,
    pub figures: BTreeMap<String, f64>,
}

impl Report {
    pub fn new(suite: &str) -> Self {
        Self {
            suite: suite.to_owned(),
            figures: BTreeMap::new(),
        }
    }

    pub fn figure(&mut self, name: &str, value: f64) {
        // Two decimals are plenty for microseconds and ratios, and keep the JSON readable.
        self.figures
            .insert(name.to_owned(), (value * 100.0).round() / 100.0);
    }

    pub fn print(&self) {
        println!("suite {}", self.suite);
        for (name, value) in &self.figures {
            println!("  {name:<40} {value:>14.2}");
        }
    }

    pub fn write_json(&self, path: &Path) -> anyhow::Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(path, text + "\n")
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))
    }
}
