//! onnxruntime's custom-op library for `--target onnxruntime-ops`: the op
//! `BipartiteMerge` (domain `ai.tome`, `TOME_SPEC.md`), a block's matching
//! and size-weighted merge in one node, on the CPU execution provider.
//! The standard-op merge costs about 40 small nodes per block, a few
//! microseconds each whatever their size; this node reads each token once.
//!
//! ```python
//! so = onnxruntime.SessionOptions()
//! so.register_custom_ops_library("target/release/libtome_ort_ops.so")
//! ```
//!
//! The library speaks onnxruntime's C API (`onnxruntime_c_api.h`) directly:
//! `OrtApi` is a table of functions that only ever grows at the end, so a
//! function's index is fixed, and this library reads the few it calls by
//! index. It asks for API version 17 (onnxruntime 1.17 and later).

use std::cell::Cell;
use std::ffi::{c_char, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr::{null, null_mut};
use std::sync::atomic::{AtomicBool, Ordering};

use tome_kernels::merge::{Merge, Metric, Task};

/// The op's name and domain, as `tome_passes::vit::tome` writes them.
const OP_NAME: &CStr = c"BipartiteMerge";
const DOMAIN: &CStr = c"ai.tome";
const API_VERSION: u32 = 17;

type Status = *mut c_void;
type Value = c_void;

/// `OrtApiBase`.
#[repr(C)]
pub struct ApiBase {
    get_api: unsafe extern "system" fn(version: u32) -> *const Api,
    get_version_string: unsafe extern "system" fn() -> *const c_char,
}

/// The first entries of `OrtApi`, the ones this library calls and those
/// before them.
#[repr(C)]
pub struct Api {
    table: [*const c_void; 275],
}

// Indices into `OrtApi` (onnxruntime_c_api.h, in declaration order).
const CREATE_STATUS: usize = 0;
const CREATE_CUSTOM_OP_DOMAIN: usize = 26;
const CUSTOM_OP_DOMAIN_ADD: usize = 27;
const ADD_CUSTOM_OP_DOMAIN: usize = 28;
const GET_TENSOR_MUTABLE_DATA: usize = 51;
const GET_TENSOR_ELEMENT_TYPE: usize = 60;
const GET_DIMENSIONS_COUNT: usize = 61;
const GET_DIMENSIONS: usize = 62;
const GET_TENSOR_TYPE_AND_SHAPE: usize = 65;
const KERNEL_INFO_GET_ATTRIBUTE_INT64: usize = 86;
const KERNEL_CONTEXT_GET_INPUT_COUNT: usize = 88;
const KERNEL_CONTEXT_GET_OUTPUT_COUNT: usize = 89;
const KERNEL_CONTEXT_GET_INPUT: usize = 90;
const KERNEL_CONTEXT_GET_OUTPUT: usize = 91;
const KERNEL_CONTEXT_PARALLEL_FOR: usize = 274;
const RELEASE_STATUS: usize = 93;
const RELEASE_TENSOR_TYPE_AND_SHAPE_INFO: usize = 99;

const ORT_FAIL: i32 = 1;
const ORT_INVALID_ARGUMENT: i32 = 2;
const TENSOR_FLOAT: i32 = 1;

impl Api {
    /// Entry `index` as the function type `F` it has in the header.
    unsafe fn get<F: Copy>(&self, index: usize) -> F {
        debug_assert_eq!(size_of::<F>(), size_of::<*const c_void>());
        std::mem::transmute_copy(&self.table[index])
    }

    fn status(&self, code: i32, message: &str) -> Status {
        let message = CString::new(message.replace('\0', " ")).unwrap_or_default();
        unsafe { self.get::<unsafe extern "system" fn(i32, *const c_char) -> Status>(CREATE_STATUS)(code, message.as_ptr()) }
    }

    /// `Ok` for a null status, else the status released and `Err` with it
    /// handed back as a fresh one (the caller returns it).
    fn check(&self, status: Status, what: &str) -> Result<(), Status> {
        match self.succeeded(status) {
            true => Ok(()),
            false => Err(self.status(ORT_FAIL, &format!("{}: {what} failed", op_name()))),
        }
    }

    /// Whether `status` is success (null); a failure's status is released.
    fn succeeded(&self, status: Status) -> bool {
        if !status.is_null() {
            unsafe { self.get::<unsafe extern "system" fn(Status)>(RELEASE_STATUS)(status) };
        }
        status.is_null()
    }

    /// A tensor's element type and dimensions.
    unsafe fn type_and_shape(&self, value: *const Value) -> Result<(i32, Vec<i64>), Status> {
        let mut info = null_mut();
        let get_info: unsafe extern "system" fn(*const Value, *mut *mut c_void) -> Status = self.get(GET_TENSOR_TYPE_AND_SHAPE);
        self.check(get_info(value, &mut info), "GetTensorTypeAndShape")?;
        let (mut elem, mut rank) = (0i32, 0usize);
        let get_elem: unsafe extern "system" fn(*const c_void, *mut i32) -> Status = self.get(GET_TENSOR_ELEMENT_TYPE);
        let get_rank: unsafe extern "system" fn(*const c_void, *mut usize) -> Status = self.get(GET_DIMENSIONS_COUNT);
        let get_dims: unsafe extern "system" fn(*const c_void, *mut i64, usize) -> Status = self.get(GET_DIMENSIONS);
        let described = self
            .check(get_elem(info, &mut elem), "GetTensorElementType")
            .and_then(|()| self.check(get_rank(info, &mut rank), "GetDimensionsCount"))
            .map(|()| vec![0i64; rank])
            .and_then(|mut dims| self.check(get_dims(info, dims.as_mut_ptr(), rank), "GetDimensions").map(|()| dims));
        self.get::<unsafe extern "system" fn(*mut c_void)>(RELEASE_TENSOR_TYPE_AND_SHAPE_INFO)(info);
        described.map(|dims| (elem, dims))
    }

    /// A float32 tensor's values.
    unsafe fn floats<'a>(&self, value: *const Value, what: &str) -> Result<(&'a [f32], Vec<usize>), Status> {
        let (elem, dims) = self.type_and_shape(value)?;
        if elem != TENSOR_FLOAT || dims.iter().any(|&d| d < 0) {
            let message = format!("{}: input {what} must be a float32 tensor, is element type {elem} of shape {dims:?}", op_name());
            return Err(self.status(ORT_INVALID_ARGUMENT, &message));
        }
        let dims: Vec<usize> = dims.iter().map(|&d| d as usize).collect();
        // Read only: onnxruntime hands out inputs' data through the same call.
        let data = self.data(value as *mut Value)?;
        let len = dims.iter().product();
        Ok((if len == 0 { &[] } else { std::slice::from_raw_parts(data, len) }, dims))
    }

    /// Where a float32 tensor's values are.
    unsafe fn data(&self, value: *mut Value) -> Result<*mut f32, Status> {
        let mut data = null_mut();
        let get_data: unsafe extern "system" fn(*mut Value, *mut *mut c_void) -> Status = self.get(GET_TENSOR_MUTABLE_DATA);
        self.check(get_data(value, &mut data), "GetTensorMutableData")?;
        Ok(data as *mut f32)
    }

    /// Output `index` of shape `dims`, allocated by onnxruntime.
    unsafe fn output<'a>(&self, context: *mut c_void, index: usize, dims: &[usize]) -> Result<&'a mut [f32], Status> {
        let shape: Vec<i64> = dims.iter().map(|&d| d as i64).collect();
        let mut value = null_mut();
        let get_output: unsafe extern "system" fn(*mut c_void, usize, *const i64, usize, *mut *mut Value) -> Status =
            self.get(KERNEL_CONTEXT_GET_OUTPUT);
        self.check(get_output(context, index, shape.as_ptr(), shape.len(), &mut value), "KernelContext_GetOutput")?;
        let data = self.data(value)?;
        let len = dims.iter().product();
        Ok(if len == 0 { &mut [] } else { std::slice::from_raw_parts_mut(data, len) })
    }
}

fn op_name() -> &'static str {
    OP_NAME.to_str().unwrap_or_default()
}

/// `OrtCustomOp` at version 17, every entry through `GetEndVersion`.
#[repr(C)]
struct CustomOp {
    version: u32,
    create_kernel: Option<unsafe extern "system" fn(*const CustomOp, *const Api, *const c_void) -> *mut c_void>,
    get_name: unsafe extern "system" fn(*const CustomOp) -> *const c_char,
    get_execution_provider_type: unsafe extern "system" fn(*const CustomOp) -> *const c_char,
    get_input_type: unsafe extern "system" fn(*const CustomOp, usize) -> i32,
    get_input_type_count: unsafe extern "system" fn(*const CustomOp) -> usize,
    get_output_type: unsafe extern "system" fn(*const CustomOp, usize) -> i32,
    get_output_type_count: unsafe extern "system" fn(*const CustomOp) -> usize,
    kernel_compute: Option<unsafe extern "system" fn(*mut c_void, *mut c_void)>,
    kernel_destroy: unsafe extern "system" fn(*mut c_void),
    get_input_characteristic: unsafe extern "system" fn(*const CustomOp, usize) -> i32,
    get_output_characteristic: unsafe extern "system" fn(*const CustomOp, usize) -> i32,
    get_input_memory_type: unsafe extern "system" fn(*const CustomOp, usize) -> i32,
    get_variadic_input_min_arity: unsafe extern "system" fn(*const CustomOp) -> i32,
    get_variadic_input_homogeneity: unsafe extern "system" fn(*const CustomOp) -> i32,
    get_variadic_output_min_arity: unsafe extern "system" fn(*const CustomOp) -> i32,
    get_variadic_output_homogeneity: unsafe extern "system" fn(*const CustomOp) -> i32,
    create_kernel_v2: unsafe extern "system" fn(*const CustomOp, *const Api, *const c_void, *mut *mut c_void) -> Status,
    kernel_compute_v2: unsafe extern "system" fn(*mut c_void, *mut c_void) -> Status,
    infer_output_shape: Option<unsafe extern "system" fn(*const CustomOp, *mut c_void) -> Status>,
    get_start_version: unsafe extern "system" fn(*const CustomOp) -> i32,
    get_end_version: unsafe extern "system" fn(*const CustomOp) -> i32,
}

/// Inputs (x, keys (or stacked keys, first of [S,B,H,N,D]) or scores[, size]), outputs (x, size[, log_size, or
/// [B,1,N-r,N-r] with `log_size_rows`]), all float32.
static MERGE_OP: CustomOp = CustomOp {
    version: API_VERSION,
    create_kernel: None,
    get_name: { unsafe extern "system" fn f(_: *const CustomOp) -> *const c_char { OP_NAME.as_ptr() } f },
    get_execution_provider_type: { unsafe extern "system" fn f(_: *const CustomOp) -> *const c_char { null() } f },
    get_input_type: { unsafe extern "system" fn f(_: *const CustomOp, _: usize) -> i32 { TENSOR_FLOAT } f },
    get_input_type_count: { unsafe extern "system" fn f(_: *const CustomOp) -> usize { 3 } f },
    get_output_type: { unsafe extern "system" fn f(_: *const CustomOp, _: usize) -> i32 { TENSOR_FLOAT } f },
    get_output_type_count: { unsafe extern "system" fn f(_: *const CustomOp) -> usize { 3 } f },
    kernel_compute: None,
    kernel_destroy,
    // Required, except the size input (absent before the first merge).
    get_input_characteristic: { unsafe extern "system" fn f(_: *const CustomOp, i: usize) -> i32 { (i == 2) as i32 } f },
    get_output_characteristic: { unsafe extern "system" fn f(_: *const CustomOp, i: usize) -> i32 { (i == 2) as i32 } f },
    get_input_memory_type: { unsafe extern "system" fn f(_: *const CustomOp, _: usize) -> i32 { 0 } f },
    get_variadic_input_min_arity: { unsafe extern "system" fn f(_: *const CustomOp) -> i32 { 1 } f },
    get_variadic_input_homogeneity: { unsafe extern "system" fn f(_: *const CustomOp) -> i32 { 1 } f },
    get_variadic_output_min_arity: { unsafe extern "system" fn f(_: *const CustomOp) -> i32 { 1 } f },
    get_variadic_output_homogeneity: { unsafe extern "system" fn f(_: *const CustomOp) -> i32 { 1 } f },
    create_kernel_v2,
    kernel_compute_v2,
    infer_output_shape: None,
    get_start_version: { unsafe extern "system" fn f(_: *const CustomOp) -> i32 { 1 } f },
    get_end_version: { unsafe extern "system" fn f(_: *const CustomOp) -> i32 { i32::MAX } f },
};

// The op table holds only function pointers and constants.
unsafe impl Sync for CustomOp {}

/// One `BipartiteMerge` node: its attributes, and the API to call.
struct Kernel {
    api: *const Api,
    r: usize,
    prefix: usize,
    keys_transposed: bool,
    /// `log(size)` spread over query rows, [B,1,N-r,N-r].
    log_size_rows: bool,
}

unsafe extern "system" fn create_kernel_v2(_: *const CustomOp, api: *const Api, info: *const c_void, kernel: *mut *mut c_void) -> Status {
    let api = &*api;
    let attribute = |name: &CStr| {
        let mut value = 0i64;
        let get: unsafe extern "system" fn(*const c_void, *const c_char, *mut i64) -> Status = api.get(KERNEL_INFO_GET_ATTRIBUTE_INT64);
        // An absent attribute is a failed status, released here.
        api.succeeded(get(info, name.as_ptr(), &mut value)).then_some(value)
    };
    let (r, prefix, transposed) = (attribute(c"r"), attribute(c"prefix").unwrap_or(0), attribute(c"keys_transposed").unwrap_or(0));
    let rows = attribute(c"log_size_rows").unwrap_or(0);
    match r {
        Some(r) if r >= 1 && prefix >= 0 && (0..=1).contains(&transposed) && (0..=1).contains(&rows) => {
            let kernel_data = Kernel { api, r: r as usize, prefix: prefix as usize, keys_transposed: transposed == 1, log_size_rows: rows == 1 };
            *kernel = Box::into_raw(Box::new(kernel_data)) as *mut c_void;
            null_mut()
        }
        _ => api.status(
            ORT_INVALID_ARGUMENT,
            &format!(
                "{}: needs int attributes r >= 1, prefix >= 0, keys_transposed and log_size_rows 0 or 1, has r={r:?}, prefix={prefix}, keys_transposed={transposed}, log_size_rows={rows}",
                op_name()
            ),
        ),
    }
}

unsafe extern "system" fn kernel_destroy(kernel: *mut c_void) {
    if !kernel.is_null() {
        drop(Box::from_raw(kernel as *mut Kernel));
    }
}

unsafe extern "system" fn kernel_compute_v2(kernel: *mut c_void, context: *mut c_void) -> Status {
    let kernel = &*(kernel as *const Kernel);
    let api = &*kernel.api;
    match catch_unwind(AssertUnwindSafe(|| compute(kernel, api, context))) {
        Ok(Ok(())) => null_mut(),
        Ok(Err(status)) => status,
        Err(_) => api.status(ORT_FAIL, &format!("{}: the kernel panicked", op_name())),
    }
}

unsafe fn compute(kernel: &Kernel, api: &Api, context: *mut c_void) -> Result<(), Status> {
    let mut count = 0usize;
    let get_count: unsafe extern "system" fn(*const c_void, *mut usize) -> Status = api.get(KERNEL_CONTEXT_GET_INPUT_COUNT);
    api.check(get_count(context, &mut count), "KernelContext_GetInputCount")?;
    let get_input: unsafe extern "system" fn(*const c_void, usize, *mut *const Value) -> Status = api.get(KERNEL_CONTEXT_GET_INPUT);
    let input = |index: usize| -> Result<*const Value, Status> {
        let mut value = null();
        if index < count {
            api.check(get_input(context, index, &mut value), "KernelContext_GetInput")?;
        }
        Ok(value)
    };
    let (x, dims) = api.floats(input(0)?, "x")?;
    let (keys, keys_dims) = api.floats(input(1)?, "keys or scores")?;
    let size = match input(2)? {
        s if s.is_null() => None,
        s => Some(api.floats(s, "size")?.0),
    };
    let &[batch, n, c] = dims.as_slice() else {
        return Err(api.status(ORT_INVALID_ARGUMENT, &format!("{}: x must be [B,N,C], is {dims:?}", op_name())));
    };
    let Some(metric) = Metric::of(keys, &keys_dims, kernel.keys_transposed) else {
        let message = format!("{}: input 1 must be keys [B,H,N,D] (or stacked first, [S,B,H,N,D]) or scores [B,N/2,N/2], is {keys_dims:?}", op_name());
        return Err(api.status(ORT_INVALID_ARGUMENT, &message));
    };
    let merge = Merge { x, metric, size, batch, n, c, r: kernel.r, prefix: kernel.prefix };
    merge.check_lengths().map_err(|e| api.status(ORT_INVALID_ARGUMENT, &format!("{}: {e}", op_name())))?;
    let out_n = n - kernel.r;
    let out_x = api.output(context, 0, &[batch, out_n, c])?;
    let out_size = api.output(context, 1, &[batch, out_n, 1])?;
    let mut outputs = 0usize;
    let get_output_count: unsafe extern "system" fn(*const c_void, *mut usize) -> Status = api.get(KERNEL_CONTEXT_GET_OUTPUT_COUNT);
    api.check(get_output_count(context, &mut outputs), "KernelContext_GetOutputCount")?;
    let log_size_dims = if kernel.log_size_rows { vec![batch, 1, out_n, out_n] } else { vec![batch, out_n, 1] };
    let out_log_size = if outputs > 2 { Some(api.output(context, 2, &log_size_dims)?) } else { None };
    // The work goes to onnxruntime's own pool (threads of our own would
    // contend with its spinning workers), an image per task.
    let parallel_for: unsafe extern "system" fn(*const c_void, unsafe extern "system" fn(*mut c_void, usize), usize, usize, *mut c_void) -> Status =
        api.get(KERNEL_CONTEXT_PARALLEL_FOR);
    let failed: Cell<Option<Status>> = Cell::new(None);
    let panicked = AtomicBool::new(false);
    let pool = |count: usize, task: &(dyn Fn(usize) + Sync)| {
        let job = Task { task, panicked: &panicked };
        let status = parallel_for(context, run_task, count, 0, &job as *const Task as *mut c_void);
        if let Err(status) = api.check(status, "KernelContext_ParallelFor") {
            failed.set(failed.take().or(Some(status)));
        }
    };
    merge.run_on(&pool, out_x, out_size);
    if let Some(status) = failed.take() {
        return Err(status);
    }
    match (out_log_size, kernel.log_size_rows) {
        (Some(out), false) => tome_kernels::merge::log_of(out_size, out),
        (Some(out), true) => tome_kernels::merge::log_rows_of(out_size, out_n, out),
        (None, _) => {}
    }
    match panicked.load(Ordering::Relaxed) {
        true => Err(api.status(ORT_FAIL, &format!("{}: the kernel panicked", op_name()))),
        false => Ok(()),
    }
}

/// The kernel's task `job` (a `Task`), run for item `i`.
unsafe extern "system" fn run_task(job: *mut c_void, i: usize) {
    (*(job as *const Task)).run(i)
}

/// The library's entry point (`SessionOptions.register_custom_ops_library`):
/// adds domain `ai.tome` with `BipartiteMerge` to the session's options.
///
/// # Safety
/// onnxruntime calls it with valid options and its API base.
#[no_mangle]
pub unsafe extern "system" fn RegisterCustomOps(options: *mut c_void, api_base: *const ApiBase) -> Status {
    let api = ((*api_base).get_api)(API_VERSION);
    if api.is_null() {
        // Too old to report through: its GetApi gives no table for this version.
        return null_mut();
    }
    let api = &*api;
    let create: unsafe extern "system" fn(*const c_char, *mut *mut c_void) -> Status = api.get(CREATE_CUSTOM_OP_DOMAIN);
    let add: unsafe extern "system" fn(*mut c_void, *const CustomOp) -> Status = api.get(CUSTOM_OP_DOMAIN_ADD);
    let register: unsafe extern "system" fn(*mut c_void, *mut c_void) -> Status = api.get(ADD_CUSTOM_OP_DOMAIN);
    // The domain must outlive every session made with these options: it is
    // never released, like the op table.
    let mut domain = null_mut();
    let status = create(DOMAIN.as_ptr(), &mut domain);
    if !status.is_null() {
        return status;
    }
    let status = add(domain, &MERGE_OP);
    if !status.is_null() {
        return status;
    }
    register(options, domain)
}

