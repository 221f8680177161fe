//! Running one graph and checking what it returns: the output named, its shape against the
//! manifest's dimensions, its values finite.

use std::borrow::Cow;

use ort::session::{Session, SessionInputValue};
use ort::value::DynValue;

use crate::error::{Error, Result};
use crate::manifest::Role;

/// Runs `session` and returns the output `out`.
pub(super) fn run(
    session: &mut Session,
    graph: Role,
    inputs: Vec<(String, SessionInputValue<'static>)>,
    out: &str,
) -> Result<DynValue> {
    let inputs: Vec<(Cow<'static, str>, SessionInputValue<'static>)> = inputs
        .into_iter()
        .map(|(n, v)| (Cow::Owned(n), v))
        .collect();
    let mut outputs = session
        .run(inputs)
        .map_err(|e| Error::run(graph.name(), e))?;
    outputs
        .remove(out)
        .ok_or_else(|| Error::run(graph.name(), format!("no output named {out}")))
}

/// The data of the `f32` output `v` of `graph`, which must have shape `want`.
pub(super) fn extract_f32(v: &DynValue, graph: Role, want: &[usize]) -> Result<Vec<f32>> {
    let (shape, data) = v
        .try_extract_tensor::<f32>()
        .map_err(|e| Error::run(graph.name(), e))?;
    check_shape(graph, shape, want)?;
    Ok(data.to_vec())
}

/// A graph output that holds NaN or infinity means broken weights (or preprocessing that
/// overflowed): an error, never a description made of it.
pub(super) fn check_finite(graph: Role, what: &str, values: &[f32]) -> Result<()> {
    match values.iter().position(|x| !x.is_finite()) {
        None => Ok(()),
        Some(i) => Err(Error::run(
            graph.name(),
            format!(
                "its {what} hold {} (at index {i}): the bundle's weights or preprocessing are \
                 broken",
                values[i]
            ),
        )),
    }
}

/// [`check_shape`] of a value left in ONNX Runtime's memory.
pub(super) fn check_value_shape(v: &DynValue, graph: Role, want: &[usize]) -> Result<()> {
    match v.dtype().tensor_shape() {
        Some(shape) => check_shape(graph, shape, want),
        None => Err(Error::run(graph.name(), "an output that is not a tensor")),
    }
}

/// An output's shape must be what the manifest's dimensions say; a graph that disagrees
/// with its manifest is an error, not a silently truncated or misread tensor.
pub(super) fn check_shape(graph: Role, shape: &ort::value::Shape, want: &[usize]) -> Result<()> {
    let same = shape.len() == want.len()
        && shape
            .iter()
            .zip(want)
            .all(|(&g, &w)| g >= 0 && g as u64 == w as u64);
    if same {
        Ok(())
    } else {
        Err(Error::run(
            graph.name(),
            format!("output of shape {shape:?}; the manifest's dimensions make it {want:?}"),
        ))
    }
}
