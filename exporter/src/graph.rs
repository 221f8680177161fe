//! A small builder over the ONNX protobuf types that candle-onnx generates with prost
//! (`candle_onnx::onnx`): nodes, initializers from candle tensors, typed inputs and outputs
//! with symbolic dimensions, and the model wrapper. Nothing here knows about MODA.
//!
//! Every float initializer goes through one place, which refuses a NaN or an infinity
//! ([`check_finite`]): a non-finite weight that the verification probes do not reach (a row
//! of a position table beyond their length) would otherwise ship and poison the runtime's
//! output. Quantized weights are checked the same way before they are quantized.

use candle_core::{DType, Tensor};

use crate::{Error, Result};
use candle_onnx::onnx::{
    attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto, type_proto,
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto,
    TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};

/// The default-domain opset the graphs are written for (LayerNormalization is a standard op
/// from 17 on).
pub const OPSET: i64 = 17;
/// The ONNX IR version matching [`OPSET`] (ONNX 1.12).
pub const IR_VERSION: i64 = 8;

/// ONNX Runtime's contrib-op domain (`MatMulNBits`, `MultiHeadAttention`). A model with a node
/// of this domain declares it in its opset imports ([`GraphBuilder::finish`]); `onnx.checker`
/// then leaves those nodes unchecked (it has no schema for them) and checks the rest.
pub const MS_DOMAIN: &str = "com.microsoft";

/// One dimension of a declared input or output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dim {
    /// A fixed size.
    Fixed(i64),
    /// A symbolic size, e.g. `batch`.
    Named(String),
}

impl Dim {
    /// A symbolic dimension.
    pub fn named(name: &str) -> Self {
        Dim::Named(name.to_string())
    }
}

/// Element types used by the graphs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Elem {
    /// f32.
    F32,
    /// i64.
    I64,
    /// u8 (packed quantized weights).
    U8,
    /// i8 (int8 weights of `DynamicQuantizeMatMul`).
    I8,
}

impl Elem {
    fn code(self) -> i32 {
        match self {
            Elem::F32 => DataType::Float as i32,
            Elem::I64 => DataType::Int64 as i32,
            Elem::U8 => DataType::Uint8 as i32,
            Elem::I8 => DataType::Int8 as i32,
        }
    }

    /// The name used in the manifest.
    pub fn name(self) -> &'static str {
        match self {
            Elem::F32 => "float32",
            Elem::I64 => "int64",
            Elem::U8 => "uint8",
            Elem::I8 => "int8",
        }
    }
}

/// An attribute value.
pub enum Attr {
    /// `int`.
    Int(i64),
    /// `ints`.
    Ints(Vec<i64>),
    /// `float`.
    Float(f32),
    /// `graph`: a subgraph (an `If` node's branches), from [`GraphBuilder::subgraph`] and
    /// [`GraphBuilder::into_subgraph`].
    Graph(GraphProto),
}

fn attribute(name: &str, value: Attr) -> AttributeProto {
    let mut a = AttributeProto {
        name: name.to_string(),
        ..Default::default()
    };
    match value {
        Attr::Int(i) => {
            a.r#type = AttributeType::Int as i32;
            a.i = i;
        }
        Attr::Ints(v) => {
            a.r#type = AttributeType::Ints as i32;
            a.ints = v;
        }
        Attr::Float(f) => {
            a.r#type = AttributeType::Float as i32;
            a.f = f;
        }
        Attr::Graph(g) => {
            a.r#type = AttributeType::Graph as i32;
            a.g = Some(g);
        }
    }
    a
}

fn value_info(name: &str, elem: Elem, dims: &[Dim]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| tensor_shape_proto::Dimension {
            value: Some(match d {
                Dim::Fixed(n) => tensor_shape_proto::dimension::Value::DimValue(*n),
                Dim::Named(s) => tensor_shape_proto::dimension::Value::DimParam(s.clone()),
            }),
            ..Default::default()
        })
        .collect();
    ValueInfoProto {
        name: name.to_string(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: elem.code(),
                shape: Some(TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A graph under construction.
#[derive(Default)]
pub struct GraphBuilder {
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    inputs: Vec<ValueInfoProto>,
    outputs: Vec<ValueInfoProto>,
    counter: usize,
}

impl GraphBuilder {
    /// An empty graph.
    pub fn new() -> Self {
        Self::default()
    }

    /// A new value name, unique in this graph, starting with `hint`.
    pub fn fresh(&mut self, hint: &str) -> String {
        self.counter += 1;
        format!("{hint}_{}", self.counter)
    }

    /// Declares a graph input.
    pub fn input(&mut self, name: &str, elem: Elem, dims: &[Dim]) -> String {
        self.inputs.push(value_info(name, elem, dims));
        name.to_string()
    }

    /// Declares an optional graph input: one with an initializer of the same name, which
    /// ONNX Runtime uses when the input is not fed (an "overridable initializer"; ONNX IR 4 and
    /// later). Such an input is never constant-folded, so a graph may branch on it.
    pub fn input_with_default(
        &mut self,
        name: &str,
        elem: Elem,
        dims: &[Dim],
        default_dims: &[i64],
        default_raw: Vec<u8>,
    ) -> String {
        self.inputs.push(value_info(name, elem, dims));
        self.initializer(name.to_string(), default_dims.to_vec(), elem, default_raw)
    }

    /// A builder for a subgraph of this graph (an `If` branch): its values are named from
    /// this graph's counter, so that they never shadow a name of the outer graph, which its
    /// nodes may read. Finish it with [`GraphBuilder::into_subgraph`] and give the counter
    /// back with [`GraphBuilder::resume_after`].
    pub fn subgraph(&self) -> GraphBuilder {
        GraphBuilder {
            counter: self.counter,
            ..Default::default()
        }
    }

    /// Continues naming after the values a [`GraphBuilder::subgraph`] named.
    pub fn resume_after(&mut self, sub: &GraphBuilder) {
        self.counter = self.counter.max(sub.counter);
    }

    /// The subgraph as a `graph` attribute's value, with `outputs` (value, elem, dims) as its
    /// outputs. A subgraph has no initializers of its own here: it reads the outer graph's.
    pub fn into_subgraph(self, name: &str, outputs: &[(&str, Elem, &[Dim])]) -> GraphProto {
        GraphProto {
            node: self.nodes,
            name: name.to_string(),
            initializer: self.initializers,
            output: outputs
                .iter()
                .map(|(v, e, d)| value_info(v, *e, d))
                .collect(),
            ..Default::default()
        }
    }

    /// Declares `value` a graph output named `name` (through an `Identity` when the names
    /// differ; ONNX Runtime removes it).
    pub fn output(&mut self, value: &str, name: &str, elem: Elem, dims: &[Dim]) {
        if value != name {
            self.push("Identity", &[value], &[name], vec![]);
        }
        self.outputs.push(value_info(name, elem, dims));
    }

    /// Adds a node with explicit output names.
    pub fn push(&mut self, op: &str, inputs: &[&str], outputs: &[&str], attrs: Vec<(&str, Attr)>) {
        let name = self.fresh(op);
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            name,
            op_type: op.to_string(),
            attribute: attrs.into_iter().map(|(n, v)| attribute(n, v)).collect(),
            ..Default::default()
        });
    }

    /// Adds a node of ONNX Runtime's `com.microsoft` domain with explicit output names (an
    /// empty input name leaves that optional input out).
    pub fn push_contrib(
        &mut self,
        op: &str,
        inputs: &[&str],
        outputs: &[&str],
        attrs: Vec<(&str, Attr)>,
    ) {
        self.push(op, inputs, outputs, attrs);
        if let Some(n) = self.nodes.last_mut() {
            n.domain = MS_DOMAIN.to_string();
        }
    }

    /// Adds a node of ONNX Runtime's `com.microsoft` domain with one fresh output.
    pub fn contrib_op(&mut self, op: &str, inputs: &[&str], attrs: Vec<(&str, Attr)>) -> String {
        let out = self.fresh(&op.to_lowercase());
        self.push_contrib(op, inputs, &[&out], attrs);
        out
    }

    /// Adds a node with one fresh output and returns its name.
    pub fn op(&mut self, op: &str, inputs: &[&str], attrs: Vec<(&str, Attr)>) -> String {
        let out = self.fresh(&op.to_lowercase());
        self.push(op, inputs, &[&out], attrs);
        out
    }

    fn initializer(&mut self, name: String, dims: Vec<i64>, elem: Elem, raw: Vec<u8>) -> String {
        self.initializers.push(TensorProto {
            dims,
            data_type: elem.code(),
            name: name.clone(),
            raw_data: raw,
            ..Default::default()
        });
        name
    }

    /// Every float initializer: refused unless all its values are finite.
    fn f32_initializer(&mut self, name: String, dims: &[i64], data: &[f32]) -> Result<String> {
        check_finite(&name, dims, data)?;
        Ok(self.initializer(name, dims.to_vec(), Elem::F32, f32_bytes(data)))
    }

    /// A float initializer from a candle tensor, as is; an error if a value is not finite.
    pub fn tensor(&mut self, name: &str, t: &Tensor) -> Result<String> {
        let dims: Vec<i64> = t.dims().iter().map(|&d| d as i64).collect();
        let data = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        self.f32_initializer(name.to_string(), &dims, &data)
    }

    /// A float initializer with the given shape; an error if a value is not finite.
    pub fn const_f32(&mut self, hint: &str, dims: &[i64], data: &[f32]) -> Result<String> {
        let name = self.fresh(hint);
        self.f32_initializer(name, dims, data)
    }

    /// An int64 initializer with the given shape (`&[]` for a scalar).
    pub fn const_i64(&mut self, hint: &str, dims: &[i64], data: &[i64]) -> String {
        let name = self.fresh(hint);
        let raw = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.initializer(name, dims.to_vec(), Elem::I64, raw)
    }

    /// A uint8 initializer with the given shape.
    pub fn const_u8(&mut self, name: &str, dims: &[i64], data: Vec<u8>) -> String {
        self.initializer(name.to_string(), dims.to_vec(), Elem::U8, data)
    }

    /// An int8 initializer with the given shape.
    pub fn const_i8(&mut self, name: &str, dims: &[i64], data: &[i8]) -> String {
        let raw = data.iter().map(|&v| v as u8).collect();
        self.initializer(name.to_string(), dims.to_vec(), Elem::I8, raw)
    }

    /// A 1-d int64 constant.
    pub fn ints(&mut self, hint: &str, data: &[i64]) -> String {
        self.const_i64(hint, &[data.len() as i64], data)
    }

    /// Wraps the graph in a model with the standard opset, and `com.microsoft` version 1 when
    /// a node uses that domain.
    pub fn finish(self, name: &str, doc: &str, metadata: &[(&str, String)]) -> ModelProto {
        let mut opset_import = vec![OperatorSetIdProto {
            domain: String::new(),
            version: OPSET,
        }];
        if uses_domain(&self.nodes, MS_DOMAIN) {
            opset_import.push(OperatorSetIdProto {
                domain: MS_DOMAIN.to_string(),
                version: 1,
            });
        }
        ModelProto {
            ir_version: IR_VERSION,
            opset_import,
            producer_name: "moda-exporter".to_string(),
            producer_version: env!("CARGO_PKG_VERSION").to_string(),
            doc_string: doc.to_string(),
            graph: Some(GraphProto {
                node: self.nodes,
                name: name.to_string(),
                initializer: self.initializers,
                input: self.inputs,
                output: self.outputs,
                ..Default::default()
            }),
            metadata_props: metadata
                .iter()
                .map(|(k, v)| StringStringEntryProto {
                    key: k.to_string(),
                    value: v.clone(),
                })
                .collect(),
            ..Default::default()
        }
    }
}

/// Whether a node of `nodes`, or of a subgraph of one, is of `domain`.
fn uses_domain(nodes: &[NodeProto], domain: &str) -> bool {
    nodes.iter().any(|n| {
        n.domain == domain
            || n.attribute
                .iter()
                .filter_map(|a| a.g.as_ref())
                .any(|g| uses_domain(&g.node, domain))
    })
}

/// Refuses a weight `name` of shape `dims` (row-major `data`) that holds a NaN or an
/// infinity: the error names the tensor, the first such value and where it is.
pub fn check_finite(name: &str, dims: &[i64], data: &[f32]) -> Result<()> {
    let Some(flat) = data.iter().position(|v| !v.is_finite()) else {
        return Ok(());
    };
    // The flat position as an index into the shape.
    let mut index = vec![0usize; dims.len()];
    let mut rest = flat;
    for (slot, &d) in index.iter_mut().zip(dims).rev() {
        let d = usize::try_from(d).unwrap_or(1).max(1);
        *slot = rest % d;
        rest /= d;
    }
    Err(Error::NonFinite {
        tensor: name.to_string(),
        shape: dims.to_vec(),
        index,
        value: data[flat],
        count: data.iter().filter(|v| !v.is_finite()).count(),
    })
}

fn f32_bytes(data: &[f32]) -> Vec<u8> {
    data.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Initializers of at least this many bytes go to the graph's external data file
/// ([`move_to_external_data`]); smaller ones stay inside the graph, where the padding to
/// [`EXTERNAL_DATA_ALIGN`] would cost more than mapping them saves.
pub const EXTERNAL_DATA_MIN_BYTES: usize = 64 << 10;
/// Where each tensor starts in the external data file: a multiple of 4 KiB, the page size
/// (and the alignment ONNX Runtime's own writer uses), so that ONNX Runtime maps a tensor of a
/// CPU session straight from the file instead of reading a copy into its own memory. The
/// padding costs at most 4 KiB per tensor, a fraction of a percent of any large graph.
pub const EXTERNAL_DATA_ALIGN: usize = 4 << 10;

/// Moves `model`'s large initializers (at least [`EXTERNAL_DATA_MIN_BYTES`]) into one external
/// data buffer, each at an offset aligned to [`EXTERNAL_DATA_ALIGN`], and points them at
/// `location` (the file name the caller writes the buffer to, beside the graph). Returns the
/// buffer; empty when no initializer is that large (then the graph is left as it was).
pub fn move_to_external_data(model: &mut ModelProto, location: &str) -> Vec<u8> {
    let mut data = Vec::new();
    let Some(graph) = model.graph.as_mut() else {
        return data;
    };
    for t in &mut graph.initializer {
        if t.raw_data.len() < EXTERNAL_DATA_MIN_BYTES {
            continue;
        }
        let offset = data.len().next_multiple_of(EXTERNAL_DATA_ALIGN);
        data.resize(offset, 0);
        let raw = std::mem::take(&mut t.raw_data);
        let entry = |key: &str, value: String| StringStringEntryProto {
            key: key.to_string(),
            value,
        };
        t.external_data = vec![
            entry("location", location.to_string()),
            entry("offset", offset.to_string()),
            entry("length", raw.len().to_string()),
        ];
        t.data_location = candle_onnx::onnx::tensor_proto::DataLocation::External as i32;
        data.extend_from_slice(&raw);
    }
    data
}
