//! The file source: manifests read from files, directories and standard input into a
//! [`Snapshot`].
//!
//! Invariant: files are read in a fixed order (arguments in order, directory entries
//! sorted by name), so the same paths give the same snapshot.

use std::io::Read;
use std::path::{Path, PathBuf};

use nftproxy_model::{Diagnostic, ManifestError, Snapshot};

/// Everything read from the manifests: the objects, the objects left out, and the
/// documents that are not YAML.
#[derive(Debug, Default)]
pub struct Loaded {
    /// The objects read.
    pub snapshot: Snapshot,
    /// Objects left out, with the reason.
    pub diagnostics: Vec<Diagnostic>,
    /// Documents skipped because they are not YAML.
    pub errors: Vec<ManifestError>,
}

/// A manifest path that could not be read.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {error}")]
pub struct SourceError {
    /// The path.
    path: String,
    /// The error.
    error: std::io::Error,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SourceError + '_ {
    move |error| SourceError {
        path: path.display().to_string(),
        error,
    }
}

/// The files a list of paths names: files as given, directories expanded to their
/// `*.yaml`, `*.yml` and `*.json` entries in name order, `-` for standard input.
pub fn manifest_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, SourceError> {
    let mut files = Vec::new();
    for path in paths {
        if path.as_os_str() != "-" && path.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(io(path))?
                .filter_map(|entry| entry.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .filter(|p| {
                    p.extension()
                        .and_then(|e| e.to_str())
                        .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
                })
                .collect();
            entries.sort();
            files.extend(entries);
        } else {
            files.push(path.clone());
        }
    }
    Ok(files)
}

/// Reads every manifest into one snapshot. Only a path that cannot be read fails the
/// whole load; a broken document is reported in [`Loaded::errors`].
pub fn load(paths: &[PathBuf]) -> Result<Loaded, SourceError> {
    let mut loaded = Loaded::default();
    for file in manifest_files(paths)? {
        let bytes = if file.as_os_str() == "-" {
            let mut bytes = Vec::new();
            std::io::stdin()
                .read_to_end(&mut bytes)
                .map_err(io(&file))?;
            bytes
        } else {
            std::fs::read(&file).map_err(io(&file))?
        };
        let report = loaded
            .snapshot
            .add_manifest_bytes(&file.display().to_string(), &bytes);
        loaded.diagnostics.extend(report.diagnostics);
        loaded.errors.extend(report.errors);
    }
    Ok(loaded)
}

/// A digest of the manifest files' names and contents: equal digests, same input.
pub fn fingerprint(paths: &[PathBuf]) -> Result<u64, SourceError> {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for file in manifest_files(paths)? {
        file.hash(&mut hasher);
        std::fs::read(&file).map_err(io(&file))?.hash(&mut hasher);
    }
    Ok(hasher.finish())
}
