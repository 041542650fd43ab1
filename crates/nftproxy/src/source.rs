//! The file source: manifests read from files, directories and standard input into a
//! [`Snapshot`].
//!
//! Invariant: files are read in a fixed order (arguments in order, directory entries
//! sorted by name), so the same paths give the same snapshot.

use std::io::Read;
use std::path::{Path, PathBuf};

use nftproxy_model::{Diagnostic, ManifestError, Snapshot};

/// Why the manifests could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// A path could not be read.
    #[error("{path}: {error}")]
    Io {
        /// The path.
        path: String,
        /// The error.
        error: std::io::Error,
    },
    /// A file is not YAML.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SourceError + '_ {
    move |error| SourceError::Io {
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

/// Reads every manifest into one snapshot.
pub fn load(paths: &[PathBuf]) -> Result<(Snapshot, Vec<Diagnostic>), SourceError> {
    let mut snapshot = Snapshot::default();
    let mut diagnostics = Vec::new();
    for file in manifest_files(paths)? {
        let text = if file.as_os_str() == "-" {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(io(&file))?;
            text
        } else {
            std::fs::read_to_string(&file).map_err(io(&file))?
        };
        diagnostics.extend(snapshot.add_manifest(&file.display().to_string(), &text)?);
    }
    Ok((snapshot, diagnostics))
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
