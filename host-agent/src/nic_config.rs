//! The NIC data-plane configuration as users write it: TOML, unknown keys refused,
//! every value validated before anything is built.
//!
//! With no file the embedded default applies: 4 equal nodes, 64 shards over 65,536
//! buckets, a 1,048,576-flow connection table, the Microsoft RSS key, δ = 500 µs,
//! N = 8. `flowshard.example.toml` at the repository root shows every key.

use std::path::{Path, PathBuf};

use nic_firmware::PipelineConfig;

/// A configuration file that cannot be used, and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// Load and validate a data-plane configuration; `None` gives the embedded default.
pub fn load(path: Option<&Path>) -> Result<PipelineConfig, ConfigFileError> {
    let Some(path) = path else {
        return Ok(PipelineConfig::default());
    };
    let text = std::fs::read_to_string(path).map_err(|source| ConfigFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&text, path)
}

/// Parse configuration text; `path` names it in errors.
pub fn parse(text: &str, path: &Path) -> Result<PipelineConfig, ConfigFileError> {
    let config: PipelineConfig = toml::from_str(text).map_err(|e| ConfigFileError::Parse {
        path: path.to_owned(),
        message: e.to_string().trim_end().replace('\n', "\n  "),
    })?;
    config.validate().map_err(|e| ConfigFileError::Invalid {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        parse(text, Path::new("nic.toml")).unwrap_err().to_string()
    }

    #[test]
    fn the_example_file_is_valid_and_round_trips() {
        let text = include_str!("../../flowshard.example.toml");
        let c = parse(text, Path::new("flowshard.example.toml")).unwrap();
        assert_eq!(c.buckets, 65_536);
        let again = toml::to_string(&c).unwrap();
        assert_eq!(parse(&again, Path::new("x")).unwrap(), c);
    }

    #[test]
    fn bad_files_say_what_and_where() {
        assert!(err("bukets = 4").contains("unknown field `bukets`"));
        assert!(err("buckets = \"many\"").contains("invalid type"));
        assert!(err("buckets = 1000").contains("`buckets`: must be a power of two"));
        assert!(err("rss_key = \"00\"").contains("80 hex digits"));
        assert!(err("[[nodes]]\nid = 1\nstate = \"sleepy\"").contains("unknown variant `sleepy`"));
        assert!(err("[timeouts]\nudp_ms = 0").contains("`timeouts.udp_ms`"));
        assert!(
            load(Some(Path::new("/nonexistent/nic.toml")))
                .unwrap_err()
                .to_string()
                .contains("/nonexistent/nic.toml")
        );
    }
}
