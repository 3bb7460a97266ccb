//! The flow profiler: the trained tree ensemble served with ONNX Runtime on batches of
//! the NIC's feature records, and the same ensemble as the NIC's own tables.
//!
//! ONNX Runtime is loaded at run time (`ort`'s `load-dynamic`) from the shared library
//! that `scripts/setup.sh` takes out of the `onnxruntime` wheel, so the binary builds
//! and steers without it. The model the product ships (`models/profiler.onnx`, and its
//! trees as NIC tables, `models/profiler.trees.json`) is built into the binary; a
//! model file given on the command line replaces it.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use nic_firmware::Class;
use nic_firmware::profile::{ClassifierTables, FEATURE_NAMES, FEATURES, Forest, Node};
use ort::environment::Environment;
use ort::session::Session;
use ort::value::TensorRef;
use serde::Deserialize;

/// The shipped model, as ONNX.
pub const MODEL: &[u8] = include_bytes!("../../models/profiler.onnx");
/// The shipped model's trees, for the NIC's tables.
pub const TREES: &str = include_str!("../../models/profiler.trees.json");
/// Where `scripts/setup.sh` puts ONNX Runtime, under the data directory.
const LIBRARY_IN_DATA: &str = "onnxruntime/libonnxruntime.so";
/// What to do when ONNX Runtime is missing.
const GET_LIBRARY: &str = "run scripts/setup.sh (it installs ONNX Runtime from the onnxruntime wheel), or point ORT_DYLIB_PATH at a libonnxruntime.so of version 1.23 or newer";

/// Why the profiler cannot run.
#[derive(Debug, thiserror::Error)]
pub enum ProfilerError {
    #[error("ONNX Runtime library {} not found: {GET_LIBRARY}", path.display())]
    LibraryMissing { path: PathBuf },
    #[error("ONNX Runtime library {} cannot be used ({message}): {GET_LIBRARY}", path.display())]
    Library { path: PathBuf, message: String },
    #[error("profiler model {} not found: run `make model` to build it, or leave out --model to use the built-in one", path.display())]
    ModelMissing { path: PathBuf },
    #[error("profiler model {what}: {message}")]
    Model { what: String, message: String },
    #[error("profiler inference: {0}")]
    Inference(String),
}

/// The data directory of the project's set-up.
pub fn data_dir() -> PathBuf {
    match std::env::var_os("FLOWSHARD_DATA") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
            .join(".cache/flowshard-data"),
    }
}

/// The ONNX Runtime library to load: `ORT_DYLIB_PATH`, else the set-up's copy.
pub fn library_path() -> PathBuf {
    match std::env::var_os("ORT_DYLIB_PATH") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => data_dir().join(LIBRARY_IN_DATA),
    }
}

/// The process's one ONNX Runtime environment, created with the first profiler.
static ENVIRONMENT: OnceLock<Environment> = OnceLock::new();

fn environment(library: &Path) -> Result<&'static Environment, String> {
    static CREATING: Mutex<()> = Mutex::new(());
    let _one_at_a_time = CREATING.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(env) = ENVIRONMENT.get() {
        return Ok(env);
    }
    let env = ort::init_from(library)
        .map_err(|e| e.to_string())?
        .with_name("flowshard")
        .build()
        .map_err(|e| e.to_string())?;
    Ok(ENVIRONMENT.get_or_init(|| env))
}

/// A loaded model: classifies batches of input vectors.
#[derive(Debug)]
pub struct Profiler {
    session: Session,
    packets: u8,
    what: String,
    input: Vec<f32>,
}

/// One flow's class and the model's probability for it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Verdict {
    pub class: Class,
    pub confidence: f32,
}

impl Profiler {
    /// Load ONNX Runtime from `library` and the model from `model` (the built-in one
    /// without it), on one thread: the agent runs one profiler per core it gives it.
    pub fn load(model: Option<&Path>, library: &Path) -> Result<Profiler, ProfilerError> {
        let bytes;
        let (what, model_bytes): (String, &[u8]) = match model {
            Some(p) => {
                bytes = std::fs::read(p).map_err(|e| match e.kind() {
                    std::io::ErrorKind::NotFound => {
                        ProfilerError::ModelMissing { path: p.to_owned() }
                    }
                    _ => ProfilerError::Model {
                        what: p.display().to_string(),
                        message: e.to_string(),
                    },
                })?;
                (p.display().to_string(), &bytes)
            }
            None => ("built-in models/profiler.onnx".into(), MODEL),
        };
        if !library.exists() {
            return Err(ProfilerError::LibraryMissing {
                path: library.to_owned(),
            });
        }
        let lib_err = |message: String| ProfilerError::Library {
            path: library.to_owned(),
            message,
        };
        let env = environment(library).map_err(lib_err)?;
        let model_err = |message: String| ProfilerError::Model {
            what: what.clone(),
            message,
        };
        let builder = Session::builder(env).map_err(|e| lib_err(e.to_string()))?;
        let builder = builder
            .with_intra_threads(1)
            .map_err(|e| lib_err(e.to_string()))?;
        let mut builder = builder
            .with_inter_threads(1)
            .map_err(|e| lib_err(e.to_string()))?;
        let session = builder
            .commit_from_memory(model_bytes)
            .map_err(|e| model_err(e.to_string()))?;
        let meta = session.metadata().map_err(|e| model_err(e.to_string()))?;
        let names = meta.custom("flowshard.features").unwrap_or_default();
        if names != FEATURE_NAMES.join(",") {
            return Err(model_err(format!(
                "was trained on other features than this build computes (flowshard.features = {names:?}); rebuild it with `make model`"
            )));
        }
        let packets = meta
            .custom("flowshard.packets")
            .and_then(|n| n.parse::<u8>().ok())
            .filter(|n| (1..=16).contains(n))
            .ok_or_else(|| model_err("has no valid flowshard.packets (N) entry".into()))?;
        drop(meta);
        let outputs: Vec<&str> = session.outputs().iter().map(|o| o.name()).collect();
        if !outputs.contains(&"probabilities") {
            return Err(model_err(format!(
                "has no `probabilities` output (outputs: {outputs:?})"
            )));
        }
        Ok(Profiler {
            session,
            packets,
            what,
            input: Vec::new(),
        })
    }

    /// N: the model reads each flow's first N packets.
    pub fn packets(&self) -> u8 {
        self.packets
    }

    /// Classify a batch of input vectors, appending one verdict per vector to `out`.
    pub fn classify(
        &mut self,
        batch: &[[u32; FEATURES]],
        out: &mut Vec<Verdict>,
    ) -> Result<(), ProfilerError> {
        if batch.is_empty() {
            return Ok(());
        }
        self.input.clear();
        self.input
            .extend(batch.iter().flat_map(|x| x.iter().map(|v| *v as f32)));
        let err = |e: ort::Error| ProfilerError::Inference(e.to_string());
        let tensor =
            TensorRef::from_array_view(([batch.len(), FEATURES], &self.input[..])).map_err(err)?;
        let outputs = self
            .session
            .run(ort::inputs!["features" => tensor])
            .map_err(err)?;
        let (shape, probs) = outputs["probabilities"]
            .try_extract_tensor::<f32>()
            .map_err(err)?;
        if shape.len() != 2 || shape[0] as usize != batch.len() || shape[1] as usize != Class::COUNT
        {
            return Err(ProfilerError::Inference(format!(
                "{} returned probabilities of shape {shape:?}, expected [{}, {}]",
                self.what,
                batch.len(),
                Class::COUNT
            )));
        }
        for row in probs.chunks_exact(Class::COUNT) {
            let mut best = 0;
            for (i, p) in row.iter().enumerate() {
                if *p > row[best] {
                    best = i;
                }
            }
            out.push(Verdict {
                class: Class::ALL[best],
                confidence: row[best],
            });
        }
        Ok(())
    }
}

/// The trees file: per tree, scikit-learn's node arrays (`left` = -1 marks a leaf).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TreesFile {
    packets: u8,
    features: Vec<String>,
    trees: Vec<TreeArrays>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TreeArrays {
    feature: Vec<u16>,
    threshold: Vec<u32>,
    left: Vec<i64>,
    right: Vec<i64>,
    /// Per node; only leaves' rows are used.
    scores: Vec<[u16; Class::COUNT]>,
}

/// Read a trees file (the built-in one without a path) and compile it into NIC tables.
pub fn nic_tables(trees: Option<&Path>) -> Result<ClassifierTables, ProfilerError> {
    let (what, text) = match trees {
        Some(p) => (
            p.display().to_string(),
            std::fs::read_to_string(p).map_err(|e| ProfilerError::Model {
                what: p.display().to_string(),
                message: e.to_string(),
            })?,
        ),
        None => ("built-in models/profiler.trees.json".into(), TREES.into()),
    };
    let err = |message: String| ProfilerError::Model {
        what: what.clone(),
        message,
    };
    let file: TreesFile = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
    if file.features != FEATURE_NAMES {
        return Err(err(
            "was trained on other features than this build computes; rebuild it with `make model`"
                .into(),
        ));
    }
    let mut forest = Forest {
        packets: file.packets,
        trees: Vec::with_capacity(file.trees.len()),
    };
    for (t, a) in file.trees.iter().enumerate() {
        let n = a.feature.len();
        if [
            a.threshold.len(),
            a.left.len(),
            a.right.len(),
            a.scores.len(),
        ] != [n; 4]
        {
            return Err(err(format!("tree {t}: node arrays of different lengths")));
        }
        let nodes = (0..n)
            .map(
                |i| match (u32::try_from(a.left[i]), u32::try_from(a.right[i])) {
                    (Ok(left), Ok(right)) => Node::Split {
                        feature: a.feature[i],
                        threshold: a.threshold[i],
                        left,
                        right,
                    },
                    _ => Node::Leaf {
                        scores: a.scores[i],
                    },
                },
            )
            .collect();
        forest.trees.push(nodes);
    }
    ClassifierTables::compile(&forest).map_err(|e| err(e.to_string()))
}
