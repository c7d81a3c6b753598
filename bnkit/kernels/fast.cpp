// The express path: batch norm on a CPU tensor (float, double, bfloat16 or half) with no
// Python between the call and the C loops, as two operators registered in C++.
//
// bnkit::batch_norm computes the statistics, updates the running ones and normalizes
// (with a fused activation) in one call to cpu.c's bn_forward (linked into the same
// extension by bnkit.kernels.native); bnkit::batch_norm_backward gives every gradient in
// one call to bn_backward. Like aten's native_batch_norm, the forward returns the
// per-channel values its backward reads. Each has a CPU kernel; the forward has an
// Autograd kernel (ExpressFunction, the backward operator under a native node); their
// fake kernels are Python's (bnkit.kernels.express), so torch.library.opcheck and
// AOTAutograd trace them.
//
// batch_norm, the module's entry, decides whether a call (no ghost batches, renorm or
// sync in training; any fused activation, or a mask without one; see
// bnkit.kernels.express) is one the operator takes, and calls it through the dispatcher;
// it answers None for any other call, which then goes through the general pipeline, whose
// Python would cost hundreds of microseconds, several times the work on a small tensor.
// Large outputs come from bnkit.kernels.outputs' pool (a Python call, nothing next to the
// work); so does a double backward (a backward pass under autograd).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <Python.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

// cpu.c's whole-call loops, one pair per data type with the same signature (C names;
// declared here with untyped data pointers, which have the same calling convention as
// cpu.c's typed ones).
#define BN_LOOPS(S)                                                                          \
    int bn_forward_##S(int, const void *, const uint8_t *, void *, int64_t, int64_t, int64_t, \
                       const void *, const void *, double, int, void *, void *, void *,       \
                       double, int64_t *, int, int, int, double, int);                        \
    void bn_backward_##S(int, const void *, const void *, const uint8_t *, void *, int64_t,    \
                         int64_t, int64_t, const void *, const void *, const void *, void *,   \
                         void *, int, int, double, int, int);
extern "C" {
BN_LOOPS(f32)
BN_LOOPS(f64)
BN_LOOPS(bf16)
BN_LOOPS(f16)
}
#undef BN_LOOPS

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Optional = std::optional<at::Tensor>;
using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;  // y, stats, recorded
using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor>;    // dx, dweight, dbias

typedef decltype(&bn_forward_f32) forward_fn;
typedef decltype(&bn_backward_f32) backward_fn;

// The loops for float (0), double (1), bfloat16 (2) and half (3) data; 16-bit data is
// computed in float, with float per-channel values.
const forward_fn forward_loop[4] = {bn_forward_f32, bn_forward_f64, bn_forward_bf16,
                                    bn_forward_f16};
const backward_fn backward_loop[4] = {bn_backward_f32, bn_backward_f64, bn_backward_bf16,
                                      bn_backward_f16};

// The loops' index for a data type, or -1.
int loop_index(at::ScalarType dtype) {
    switch (dtype) {
        case at::kFloat: return 0;
        case at::kDouble: return 1;
        case at::kBFloat16: return 2;
        case at::kHalf: return 3;
        default: return -1;
    }
}

// The type of the statistics and per-channel values for a data type.
at::ScalarType compute_type(at::ScalarType dtype) {
    return dtype == at::kDouble ? at::kDouble : at::kFloat;
}
// cpu.c's codes of the fused activations (ACT_*): none (identity), leaky_relu, elu, relu.
constexpr int ACT_NONE = 0, ACT_ELU = 2, ACT_RELU = 3;

// Set by init(): the type besides torch.Tensor that a tensor argument may have
// (torch.nn.Parameter), the Python function that computes a differentiable backward
// (express._double_backward), and bnkit.kernels.activation.INVERSION_LIMIT.
PyObject *parameter_type = nullptr;
PyObject *double_backward = nullptr;
double inversion_limit = 0.0;
// The sizes the Python modules set: bnkit.kernels.cpu's SMALL_THRESHOLD (the express
// path's smallest tensor) and PARALLEL_THRESHOLD (the smallest run on several threads),
// bnkit.kernels.outputs' MIN_BYTES (the smallest output from its pool). The express
// path's entry reads them on each call (tests change them); the operators' kernels use
// the latest values.
struct Sizes {
    int64_t small = 0, parallel = 0, pool = std::numeric_limits<int64_t>::max();
} sizes;
PyObject *cpu_module = nullptr, *outputs_module = nullptr;
PyObject *small_name = nullptr, *parallel_name = nullptr, *pool_name = nullptr;
PyObject *empty_like_name = nullptr;

// An integer attribute of a module (-1 with a Python error set on failure).
int64_t module_int(PyObject *module, PyObject *name) {
    PyObject *value = PyObject_GetAttr(module, name);
    if (value == nullptr) return -1;
    const int64_t result = PyLong_AsLongLong(value);
    Py_DECREF(value);
    return result;
}

// One call's layout and options (express.Flags for the options).
struct Call {
    int kind = 0;  // 0: (N, C, L) rows, 1: (M, C) rows
    int64_t rows = 0, channels = 0, inner = 0;
    bool training = false;
    double eps = 0.0, momentum = 0.0;
    at::Tensor running_mean, running_var, tracked;  // undefined: none
    at::Tensor mask;  // bool (N, *spatial), training only; undefined: none
    bool unbiased = true, skip_nonfinite = true;
    int act = ACT_NONE;        // the fused activation (cpu.c's ACT_*)
    double param = 0.0;        // its parameter: leaky_relu's slope, elu's alpha
    bool from_output = false;  // memory-efficient: training may save y instead of x
    int threads = 1;
};

at::Tensor value(const Optional &t) { return t.has_value() ? *t : at::Tensor(); }

// x's layout as the loops see it, in call's kind, rows, channels and inner (x has two
// dimensions or more); false for other strides.
bool set_layout(const at::Tensor &x, Call *call) {
    call->channels = x.size(1);
    call->rows = x.size(0);
    if (x.is_contiguous()) {
        call->kind = x.dim() == 2 ? 1 : 0;
        call->inner = 1;
        for (int64_t d = 2; d < x.dim(); ++d) call->inner *= x.size(d);
        return true;
    }
    if ((x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
        (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d))) {
        call->kind = 1;
        call->inner = 1;
        call->rows = x.numel() / call->channels;
        return true;
    }
    return false;
}

bool plain_type(PyObject *obj) {
    return Py_TYPE(obj) == (PyTypeObject *)THPVariableClass ||
           (PyObject *)Py_TYPE(obj) == parameter_type;
}

// Whether the loops read t as a per-channel vector: (C,), contiguous, on the CPU, of `dtype`.
bool fits_vector(const at::Tensor &t, int64_t channels, at::ScalarType dtype) {
    return t.scalar_type() == dtype && t.is_cpu() && t.dim() == 1 && t.size(0) == channels &&
           t.is_contiguous();
}

// Whether the loops read mask as x's: a contiguous bool CPU tensor of shape (N, *spatial).
bool fits_mask(const at::Tensor &mask, const at::Tensor &x) {
    if (mask.scalar_type() != at::kBool || !mask.is_cpu() || !mask.is_contiguous() ||
        mask.dim() != x.dim() - 1 || mask.size(0) != x.size(0))
        return false;
    for (int64_t d = 2; d < x.dim(); ++d)
        if (mask.size(d - 1) != x.size(d)) return false;
    return true;
}

// A (C,) contiguous CPU tensor of `dtype` (of a plain tensor type), or None: sets *out.
// One of type `widen` (a 16-bit model's parameter, in a call without autograd) is read
// as a float copy.
bool vector_arg(PyObject *obj, int64_t channels, at::ScalarType dtype, at::Tensor *out,
                at::ScalarType widen = at::ScalarType::Undefined) {
    if (obj == Py_None) return true;
    if (!plain_type(obj)) return false;
    const at::Tensor &t = THPVariable_Unpack(obj);
    const bool widened = t.scalar_type() == widen && widen != at::ScalarType::Undefined;
    if (!fits_vector(t, channels, widened ? widen : dtype)) return false;
    *out = widened ? t.to(dtype) : t;
    return true;
}

// A mask the loops take, set in call->mask: a bool CPU tensor of shape (N, *spatial),
// contiguous, in training, without an activation, with two valid positions or more (the
// general path reports a bad mask, and decides what a batch with fewer valid values
// gives).
bool mask_arg(PyObject *obj, const at::Tensor &x, Call *call) {
    if (!plain_type(obj) || !call->training || call->act != ACT_NONE || call->from_output)
        return false;
    const at::Tensor &mask = THPVariable_Unpack(obj);
    if (mask.requires_grad() || !fits_mask(mask, x)) return false;
    const uint8_t *valid = (const uint8_t *)mask.data_ptr();
    int64_t count = 0;
    for (int64_t i = 0, n = mask.numel(); i < n && count < 2; ++i) count += valid[i] != 0;
    if (count < 2) return false;
    call->mask = mask;
    return true;
}

bool requires_grad(PyObject *obj) {
    return obj != Py_None && plain_type(obj) && THPVariable_Unpack(obj).requires_grad();
}

// Raise the pending Python error as a C++ exception (the GIL held by `gil` released).
[[noreturn]] void rethrow(PyGILState_STATE gil) {
    python_error error;
    error.persist();
    PyGILState_Release(gil);
    throw error;
}

// A tensor or None, as a new reference.
PyObject *wrap(const at::Tensor &t) {
    if (t.defined()) return THPVariable_Wrap(t);
    Py_RETURN_NONE;
}

// An uninitialized tensor like x: from bnkit.kernels.outputs' pool (which keeps large
// mappings; it takes the GIL) when it holds sizes.pool bytes or more, else torch's.
at::Tensor output_like(const at::Tensor &x) {
    if (x.numel() * (int64_t)x.element_size() < sizes.pool) return at::empty_like(x);
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject *wrapped = THPVariable_Wrap(x);
    PyObject *out =
        wrapped == nullptr
            ? nullptr
            : PyObject_CallMethodObjArgs(outputs_module, empty_like_name, wrapped, nullptr);
    Py_XDECREF(wrapped);
    if (out == nullptr) rethrow(gil);
    at::Tensor result = THPVariable_Unpack(out);
    Py_DECREF(out);
    PyGILState_Release(gil);
    return result;
}

const void *ptr(const at::Tensor &t) { return t.defined() ? t.data_ptr() : nullptr; }
const uint8_t *mask_ptr(const at::Tensor &mask) {
    return mask.defined() ? (const uint8_t *)mask.data_ptr() : nullptr;
}
void *mutable_ptr(const at::Tensor &t) { return t.defined() ? t.data_ptr() : nullptr; }

int forward_call(const Call &call, const at::Tensor &x, const at::Tensor &y,
                 const at::Tensor &weight, const at::Tensor &bias, const at::Tensor &saved) {
    return forward_loop[loop_index(x.scalar_type())](
        call.kind, x.data_ptr(), mask_ptr(call.mask), y.data_ptr(), call.rows, call.channels, call.inner,
        ptr(weight), ptr(bias), call.eps, call.training, mutable_ptr(saved),
        mutable_ptr(call.running_mean), mutable_ptr(call.running_var), call.momentum,
        call.tracked.defined() ? call.tracked.data_ptr<int64_t>() : nullptr, call.unbiased,
        call.skip_nonfinite, call.act, call.param, call.threads);
}

// Whether a channel's x_hat = (z - beta) / gamma loses digits: gamma = 0, or
// |beta| >= inversion_limit * |gamma| (bnkit.kernels.activation.INVERSION_LIMIT).
template <typename T>
bool lossy_channel(const at::Tensor &weight, const at::Tensor &bias, double limit) {
    const T *w = weight.data_ptr<T>();
    const T *b = bias.defined() ? bias.data_ptr<T>() : nullptr;
    for (int64_t c = 0; c < weight.numel(); ++c) {
        const double magnitude = b ? std::abs((double)b[c]) : 0.0;
        if ((double)(T)(limit * std::abs((double)w[c])) <= magnitude) return true;
    }
    return false;
}

// The smallest positive x with 1 + x != 1 in a data type.
double epsilon(at::ScalarType dtype) {
    switch (dtype) {
        case at::kDouble: return std::numeric_limits<double>::epsilon();
        case at::kBFloat16: return 0.0078125;  // 2^-7
        case at::kHalf: return 0.0009765625;   // 2^-10
        default: return std::numeric_limits<float>::epsilon();
    }
}

// Whether the backward pass can recover x_hat from the output y to working precision:
// bnkit.kernels.activation.invertible's rule for the tensors this path takes (its
// docstring says why); tests/kernels/test_express.py holds the two to the same answers.
bool output_invertible(const at::Tensor &y, const at::Tensor &weight, const at::Tensor &bias,
                       int act, double param) {
    if (weight.defined()) {
        const bool lossy = weight.scalar_type() == at::kDouble
                               ? lossy_channel<double>(weight, bias, inversion_limit)
                               : lossy_channel<float>(weight, bias, inversion_limit);
        if (lossy) return false;
    }
    if (act != ACT_ELU) return true;
    // an elu output within sqrt(eps) (relative) of its floor -alpha, compared in y's type
    // (as torch compares a tensor with a number); y is dense, so its storage is its values
    const double floor = -param * (1.0 - std::sqrt(epsilon(y.scalar_type())));
    bool near = false;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "floor", [&] {
        const scalar_t *values = y.data_ptr<scalar_t>(), limit = static_cast<scalar_t>(floor);
        const int64_t n = y.numel(), block = 4096;  // a block at a time: the loop vectorizes
        for (int64_t start = 0; start < n && !near; start += block) {
            int count = 0;
            for (int64_t i = start, end = std::min(n, start + block); i < end; ++i)
                count += values[i] <= limit;
            near = count > 0;
        }
    });
    return !near;
}

// bnkit::batch_norm's arguments (its schema, in TORCH_LIBRARY_FRAGMENT below), as its
// kernels receive them.
struct Args {
    const at::Tensor &x;
    const Optional &weight, &bias, &running_mean, &running_var, &tracked, &mask;
    bool training;
    double momentum, eps;
    bool unbiased, skip_nonfinite;
    int64_t act;
    double param;
    bool from_output;
};

// Refuse a per-channel tensor the loops cannot read: (C,), contiguous, of the compute type.
void check_vector(const char *name, const Optional &t, int64_t channels, at::ScalarType type) {
    TORCH_CHECK(!t.has_value() || fits_vector(*t, channels, type),
                "bnkit::batch_norm: expected ", name, " a contiguous (", channels, ",) ", type,
                " CPU tensor, got ", t->scalar_type(), " of shape ", t->sizes());
}

// The call the loops run for `args`: x's layout, the options, the settings' sizes.
// Arguments the loops cannot take are refused (the express path passes only valid ones).
Call make_call(const Args &args) {
    Call call;
    TORCH_CHECK(args.x.dim() >= 2 && loop_index(args.x.scalar_type()) >= 0 && args.x.is_cpu(),
                "bnkit::batch_norm: expected a float, double, bfloat16 or half CPU tensor "
                "(N, C, *), got ", args.x.scalar_type(), " of shape ", args.x.sizes());
    TORCH_CHECK(set_layout(args.x, &call),
                "bnkit::batch_norm: expected a contiguous or channels-last input, got strides ",
                args.x.strides());
    const at::ScalarType compute = compute_type(args.x.scalar_type());
    check_vector("weight", args.weight, call.channels, compute);
    check_vector("bias", args.bias, call.channels, compute);
    check_vector("running_mean", args.running_mean, call.channels, compute);
    check_vector("running_var", args.running_var, call.channels, compute);
    TORCH_CHECK(args.running_mean.has_value() == args.running_var.has_value(),
                "bnkit::batch_norm: expected running_mean and running_var both or neither");
    TORCH_CHECK(args.eps > 0 && std::isfinite(args.eps),
                "bnkit::batch_norm: expected eps > 0, got ", args.eps);
    TORCH_CHECK(!args.tracked.has_value() || (args.tracked->scalar_type() == at::kLong &&
                                              args.tracked->numel() == 1 && args.tracked->is_cpu()),
                "bnkit::batch_norm: expected num_batches_tracked a one-element int64 tensor");
    TORCH_CHECK(args.act >= ACT_NONE && args.act <= ACT_RELU,
                "bnkit::batch_norm: expected an activation code in [0, 3], got ", args.act);
    TORCH_CHECK(args.act == ACT_NONE || args.act == ACT_RELU ||
                    (args.param > 0 && std::isfinite(args.param)),
                "bnkit::batch_norm: expected param > 0 and finite for leaky_relu and elu, got ",
                args.param);
    if (args.mask.has_value()) {
        const at::Tensor &mask = *args.mask;
        TORCH_CHECK(fits_mask(mask, args.x) && args.training && args.act == ACT_NONE &&
                        !args.from_output,
                    "bnkit::batch_norm: expected a mask only in training without an "
                    "activation, a contiguous bool tensor of shape (N, *spatial), got ",
                    mask.scalar_type(), " of shape ", mask.sizes());
    }
    call.training = args.training;
    call.momentum = args.momentum;
    call.eps = args.eps;
    call.running_mean = value(args.running_mean);
    call.running_var = value(args.running_var);
    call.tracked = value(args.tracked);
    call.mask = value(args.mask);
    call.unbiased = args.unbiased;
    call.skip_nonfinite = args.skip_nonfinite;
    call.act = (int)args.act;
    call.param = args.param;
    call.from_output = args.from_output;
    call.threads = args.x.numel() >= sizes.parallel ? at::get_num_threads() : 1;
    return call;
}

// bnkit::batch_norm's CPU kernel: (output, the 5 * C values the backward reads, whether
// the running statistics took the batch as a 0-d bool).
Outputs forward_cpu(const at::Tensor &x, const Optional &weight, const Optional &bias,
                    const Optional &running_mean, const Optional &running_var,
                    const Optional &tracked, const Optional &mask, bool training,
                    double momentum, double eps, bool unbiased, bool skip_nonfinite,
                    int64_t act, double param, bool from_output) {
    const Call call = make_call({x, weight, bias, running_mean, running_var, tracked, mask,
                                 training, momentum, eps, unbiased, skip_nonfinite, act, param,
                                 from_output});
    at::Tensor y = output_like(x);
    at::Tensor stats =
        at::empty({5 * call.channels}, x.options().dtype(compute_type(x.scalar_type())));
    at::Tensor recorded = at::empty({}, x.options().dtype(at::kBool));
    *recorded.data_ptr<bool>() = forward_call(call, x, y, value(weight), value(bias), stats) != 0;
    return {y, stats, recorded};
}

// bnkit::batch_norm_backward's CPU kernel: (dx, dweight, dbias), undefined where
// output_mask says the gradient is not wanted. `src` is the input x, or the output y
// where the forward saved it (from_output); bias is needed only then, and with an
// activation.
Grads backward_cpu(const at::Tensor &grad_output, const at::Tensor &src, const at::Tensor &stats,
                   const Optional &weight, const Optional &bias, const Optional &mask,
                   bool training, int64_t act, double param, bool from_output,
                   std::array<bool, 3> output_mask) {
    Call call;
    TORCH_CHECK(src.dim() >= 2 && loop_index(src.scalar_type()) >= 0 && set_layout(src, &call),
                "bnkit::batch_norm_backward: expected an input bnkit::batch_norm takes, got ",
                src.scalar_type(), " of shape ", src.sizes(), " and strides ", src.strides());
    const int threads = src.numel() >= sizes.parallel ? at::get_num_threads() : 1;
    at::Tensor g = grad_output, dx, dw, db;
    if (output_mask[0]) dx = output_like(src);
    if (g.scalar_type() != src.scalar_type() || !g.strides().equals(src.strides())) {
        // g in x's layout, as the loops read it. Copied into dx where there is one: the
        // loops read each value of g before they write dx at the same position, so an
        // expanded gradient (a sum's) costs no tensor besides dx.
        if (output_mask[0]) {
            dx.copy_(g);
            g = dx;
        } else {
            g = g.to(src.scalar_type());
            g = src.is_contiguous()
                    ? g.contiguous()
                    : g.contiguous(src.dim() == 4 ? at::MemoryFormat::ChannelsLast
                                                  : at::MemoryFormat::ChannelsLast3d);
        }
    }
    if (output_mask[1]) dw = at::empty({call.channels}, stats.options());
    if (output_mask[2]) db = at::empty({call.channels}, stats.options());
    backward_loop[loop_index(src.scalar_type())](
        call.kind, g.data_ptr(), src.data_ptr(), mask_ptr(value(mask)), mutable_ptr(dx),
        call.rows, call.channels, call.inner, stats.data_ptr(), ptr(value(weight)),
        ptr(value(bias)), mutable_ptr(dw), mutable_ptr(db), training, (int)act, param,
        from_output, threads);
    return {dx, dw, db};
}

// The operators as the dispatcher calls them (found on first use).
const auto &forward_op() {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("bnkit::batch_norm", "")
                               .typed<decltype(forward_cpu)>();
    return op;
}
const auto &backward_op() {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("bnkit::batch_norm_backward", "")
                               .typed<decltype(backward_cpu)>();
    return op;
}

// Whether a tensor's values can be read here: false for the tensors of a trace (fake,
// functional, vmap-batched), whose values must not decide what the graph does.
bool readable(const at::Tensor &t) {
    static const c10::DispatchKeySet traced({c10::DispatchKey::Python,
                                             c10::DispatchKey::Functionalize,
                                             c10::DispatchKey::FuncTorchBatched});
    return !t.key_set().has_any(traced) && t.has_storage();
}

// bnkit::batch_norm's autograd: the forward below autograd, one call to the backward
// operator for the gradients (or, under autograd or for batched gradients, Python's
// differentiable formula).
struct ExpressFunction : public torch::autograd::Function<ExpressFunction> {
    // weight and bias are optional: absent ones are no inputs of the node (its edges are
    // x's, then weight's and bias's where given), but have a (null) gradient slot.
    static variable_list forward(AutogradContext *ctx, const at::Tensor &x,
                                 const Optional &weight_arg, const Optional &bias_arg,
                                 const Args *args) {
        at::AutoDispatchBelowADInplaceOrView below;
        auto [y, stats, recorded] =
            forward_op().call(x, weight_arg, bias_arg, args->running_mean, args->running_var,
                              args->tracked, args->mask, args->training, args->momentum,
                              args->eps, args->unbiased, args->skip_nonfinite, args->act,
                              args->param, args->from_output);
        const at::Tensor weight = value(weight_arg), bias = value(bias_arg);
        // Memory-efficient: the output y alone where it gives x_hat back (the next layer
        // keeps y anyway). Else x; the bias with an activation, whose slope a double
        // backward recomputes. In eval the population statistics are saved too, as torch
        // saves them: changing them in place before the backward pass then raises
        // autograd's error instead of giving a double backward the changed values.
        const bool from_y = args->training && args->from_output && readable(y) &&
                            output_invertible(y, weight, bias, (int)args->act, args->param);
        // Seven slots, undefined where there is nothing: x or y, weight, bias, the 5 * C
        // values, the population statistics (eval), the mask (training).
        const at::Tensor slope_bias = args->act != ACT_NONE || from_y ? bias : at::Tensor();
        const at::Tensor none;
        ctx->save_for_backward({from_y ? y : x, weight, slope_bias, stats,
                                args->training ? none : value(args->running_mean),
                                args->training ? none : value(args->running_var),
                                value(args->mask)});
        ctx->saved_data["has_weight"] = weight.defined();
        ctx->saved_data["has_bias"] = bias.defined();
        ctx->saved_data["training"] = args->training;
        ctx->saved_data["act"] = args->act;
        ctx->saved_data["param"] = args->param;
        ctx->saved_data["from_y"] = from_y;
        ctx->saved_data["eps"] = args->eps;
        ctx->mark_non_differentiable({stats, recorded});
        // The statistics and the flag have no gradient: no zeros made for them in the
        // backward pass (two allocations a step, a tenth of a small layer's backward).
        ctx->set_materialize_grads(false);
        return {y, stats, recorded};
    }

    static variable_list backward(AutogradContext *ctx, variable_list grads) {
        const at::Tensor &g = grads[0];
        if (!g.defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
        const variable_list saved = ctx->get_saved_variables();
        const bool has_weight = ctx->saved_data["has_weight"].toBool();
        const bool has_bias = ctx->saved_data["has_bias"].toBool();
        const bool need_x = ctx->needs_input_grad(0);
        const bool need_w = has_weight && ctx->needs_input_grad(1);
        const bool need_b = has_bias && ctx->needs_input_grad(has_weight ? 2 : 1);
        // Under autograd, or for gradients without storage (batched by vmap, as
        // autograd.grad(..., is_grads_batched=True) makes them): torch operations.
        if (at::GradMode::is_enabled() || !g.has_storage())
            return differentiable(ctx, saved, g, need_x, need_w, need_b);
        auto optional = [](const at::Tensor &t) { return t.defined() ? Optional(t) : Optional(); };
        at::AutoDispatchBelowADInplaceOrView below;
        auto [dx, dw, db] = backward_op().call(
            g, saved[0], saved[3], optional(saved[1]), optional(saved[2]), optional(saved[6]),
            ctx->saved_data["training"].toBool(), ctx->saved_data["act"].toInt(),
            ctx->saved_data["param"].toDouble(), ctx->saved_data["from_y"].toBool(),
            {need_x, need_w, need_b});
        return {dx, dw, db, at::Tensor()};
    }

    // Gradients that are themselves differentiable, or batched: Python's
    // express._double_backward(saved tensors, g, node, needs).
    static variable_list differentiable(AutogradContext *ctx, const variable_list &saved_vars,
                                        const at::Tensor &g, bool need_x, bool need_w,
                                        bool need_b) {
        PyGILState_STATE gil = PyGILState_Ensure();
        PyObject *tensors = PyTuple_New((Py_ssize_t)saved_vars.size());
        if (tensors == nullptr) rethrow(gil);
        for (size_t i = 0; i < saved_vars.size(); ++i)
            PyTuple_SET_ITEM(tensors, (Py_ssize_t)i, wrap(saved_vars[i]));
        auto flag = [](bool value) { return value ? Py_True : Py_False; };
        PyObject *out = PyObject_CallFunction(
            double_backward, "NN(dOidO)(OOO)", tensors, THPVariable_Wrap(g),
            ctx->saved_data["eps"].toDouble(), flag(ctx->saved_data["training"].toBool()),
            (int)ctx->saved_data["act"].toInt(), ctx->saved_data["param"].toDouble(),
            flag(ctx->saved_data["from_y"].toBool()), flag(need_x), flag(need_w), flag(need_b));
        if (out == nullptr) rethrow(gil);
        variable_list result;
        for (Py_ssize_t i = 0; i < 3; ++i) {
            PyObject *item = PyTuple_GET_ITEM(out, i);
            result.push_back(item == Py_None ? at::Tensor() : THPVariable_Unpack(item));
        }
        Py_DECREF(out);
        PyGILState_Release(gil);
        result.push_back(at::Tensor());
        return result;
    }
};

// bnkit::batch_norm's Autograd kernel.
Outputs forward_autograd(const at::Tensor &x, const Optional &weight, const Optional &bias,
                         const Optional &running_mean, const Optional &running_var,
                         const Optional &tracked, const Optional &mask, bool training,
                         double momentum, double eps, bool unbiased, bool skip_nonfinite,
                         int64_t act, double param, bool from_output) {
    const auto grad = [](const Optional &t) { return t.has_value() && t->requires_grad(); };
    if (!at::GradMode::is_enabled() || !(x.requires_grad() || grad(weight) || grad(bias))) {
        // nothing to record: no node (building one costs more than a small call's work)
        at::AutoDispatchBelowADInplaceOrView below;
        return forward_op().call(x, weight, bias, running_mean, running_var, tracked, mask,
                                 training, momentum, eps, unbiased, skip_nonfinite, act,
                                 param, from_output);
    }
    const Args args{x,        weight,   bias, running_mean, running_var,    tracked, mask,
                    training, momentum, eps,  unbiased,     skip_nonfinite, act,     param,
                    from_output};
    const variable_list out = ExpressFunction::apply(x, weight, bias, &args);
    return {out[0], out[1], out[2]};
}

// The sizes from their Python modules (false with a Python error set on failure).
bool read_sizes() {
    sizes.small = module_int(cpu_module, small_name);
    sizes.parallel = module_int(cpu_module, parallel_name);
    sizes.pool = module_int(outputs_module, pool_name);
    return !PyErr_Occurred();
}

// A momentum the loops take: a number in [0, 1], or None (the cumulative average, -1).
bool momentum_arg(PyObject *obj, double *out) {
    if (obj == Py_None) {
        *out = -1.0;
        return true;
    }
    if (!(PyFloat_CheckExact(obj) || PyLong_CheckExact(obj))) return false;
    *out = PyFloat_AsDouble(obj);
    return *out >= 0.0 && *out <= 1.0;
}

// batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps,
//            num_batches_tracked, flags, mask)
//   -> (output, recorded) or None (express.batch_norm's contract; flags: express.Flags).
// Decides whether bnkit::batch_norm takes the call, and calls it.
PyObject *batch_norm(PyObject *, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 11 || parameter_type == nullptr) Py_RETURN_NONE;
    HANDLE_TH_ERRORS
    PyObject *x_obj = args[0];
    if (!plain_type(x_obj)) Py_RETURN_NONE;
    const at::Tensor &x = THPVariable_Unpack(x_obj);
    const at::ScalarType dtype = x.scalar_type();
    if (!x.is_cpu() || loop_index(dtype) < 0 || x.dim() < 2) Py_RETURN_NONE;
    if (!read_sizes()) return nullptr;
    Call call;
    if (x.numel() < sizes.small || !set_layout(x, &call)) Py_RETURN_NONE;  // tiny: the general path
    const bool training = args[5] == Py_True;
    if (!training && args[5] != Py_False) Py_RETURN_NONE;
    if (training && call.rows * call.inner < 2) Py_RETURN_NONE;
    PyObject *eps_obj = args[7];
    if (!(PyFloat_CheckExact(eps_obj) || PyLong_CheckExact(eps_obj))) Py_RETURN_NONE;
    const double eps = PyFloat_AsDouble(eps_obj);
    if (!(eps > 0)) Py_RETURN_NONE;
    // A 16-bit model (model.to(torch.bfloat16)) in a call without autograd: its
    // parameters, and in eval its population statistics, are read as float copies.
    const at::ScalarType compute = compute_type(dtype);
    const bool grad_free = !at::GradMode::is_enabled() ||
                           !(x.requires_grad() || requires_grad(args[3]) || requires_grad(args[4]));
    const at::ScalarType widen = compute != dtype && grad_free ? dtype : at::ScalarType::Undefined;
    at::Tensor weight, bias, running_mean, running_var, tracked;
    if (!vector_arg(args[3], call.channels, compute, &weight, widen) ||
        !vector_arg(args[4], call.channels, compute, &bias, widen))
        Py_RETURN_NONE;
    bool update = false;
    if (args[1] == Py_None || args[2] == Py_None) {
        if (!training || args[1] != args[2]) Py_RETURN_NONE;
    } else {
        const at::ScalarType population = training ? at::ScalarType::Undefined : widen;
        if (!vector_arg(args[1], call.channels, compute, &running_mean, population) ||
            !vector_arg(args[2], call.channels, compute, &running_var, population) ||
            running_mean.requires_grad() || running_var.requires_grad())
            Py_RETURN_NONE;
        update = training;
    }
    double momentum;
    if (!momentum_arg(args[6], &momentum)) Py_RETURN_NONE;
    if (update && momentum < 0.0 && args[8] == Py_None) Py_RETURN_NONE;
    if (update && args[8] != Py_None) {
        if (Py_TYPE(args[8]) != (PyTypeObject *)THPVariableClass) Py_RETURN_NONE;
        tracked = THPVariable_Unpack(args[8]);
        if (tracked.scalar_type() != at::kLong || !tracked.is_cpu() || tracked.numel() != 1)
            Py_RETURN_NONE;
    }
    PyObject *flags = args[9];
    if (!PyTuple_Check(flags) || PyTuple_GET_SIZE(flags) != 6) Py_RETURN_NONE;
    PyObject *const *flag = &PyTuple_GET_ITEM(flags, 0);
    if (!PyBool_Check(flag[0]) || !PyBool_Check(flag[1]) || !PyLong_CheckExact(flag[2]) ||
        !PyFloat_CheckExact(flag[3]) || !PyBool_Check(flag[4]) || !PyBool_Check(flag[5]))
        Py_RETURN_NONE;
    if (training && flag[5] != Py_True) Py_RETURN_NONE;  // ghost batches, renorm, sync
    call.training = training;
    call.act = (int)PyLong_AsLong(flag[2]);
    call.from_output = flag[4] == Py_True;
    if (call.act < 0 || call.act > ACT_RELU) Py_RETURN_NONE;
    if (args[10] != Py_None && !mask_arg(args[10], x, &call)) Py_RETURN_NONE;

    auto optional = [](const at::Tensor &t) { return t.defined() ? Optional(t) : Optional(); };
    auto [output, stats, recorded] = forward_op().call(
        x, optional(weight), optional(bias), optional(running_mean), optional(running_var),
        optional(tracked), optional(call.mask), training, momentum, eps, flag[0] == Py_True,
        flag[1] == Py_True, call.act, PyFloat_AsDouble(flag[3]), call.from_output);
    PyObject *took = update ? (recorded.item<bool>() ? Py_True : Py_False) : Py_None;
    Py_INCREF(took);
    return Py_BuildValue("(NN)", THPVariable_Wrap(output), took);
    END_HANDLE_TH_ERRORS
}

// init(Parameter, double_backward, inversion_limit, cpu_module, outputs_module)
PyObject *init(PyObject *, PyObject *args) {
    PyObject *parameter, *fallback, *cpu, *outputs;
    if (!PyArg_ParseTuple(args, "OOdOO", &parameter, &fallback, &inversion_limit, &cpu,
                          &outputs))
        return nullptr;
    Py_XINCREF(parameter);
    Py_XSETREF(parameter_type, parameter);
    Py_XINCREF(fallback);
    Py_XSETREF(double_backward, fallback);
    Py_INCREF(cpu);
    Py_XSETREF(cpu_module, cpu);
    Py_INCREF(outputs);
    Py_XSETREF(outputs_module, outputs);
    if (small_name == nullptr) {
        small_name = PyUnicode_InternFromString("SMALL_THRESHOLD");
        parallel_name = PyUnicode_InternFromString("PARALLEL_THRESHOLD");
        pool_name = PyUnicode_InternFromString("MIN_BYTES");
        empty_like_name = PyUnicode_InternFromString("empty_like");
    }
    if (!read_sizes()) return nullptr;
    Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"batch_norm", (PyCFunction)(void (*)(void))batch_norm, METH_FASTCALL,
     "express.batch_norm: (output, recorded), or None for a call it does not take"},
    {"init", (PyCFunction)init, METH_VARARGS, "the loops and settings"},
    {nullptr, nullptr, 0, nullptr}};

#define BNKIT_STRING2(name) #name
#define BNKIT_STRING(name) BNKIT_STRING2(name)
#define BNKIT_JOIN2(a, b) a##b
#define BNKIT_JOIN(a, b) BNKIT_JOIN2(a, b)

// TORCH_EXTENSION_NAME: the module's name, set by torch.utils.cpp_extension.
PyModuleDef module_def = {PyModuleDef_HEAD_INIT, BNKIT_STRING(TORCH_EXTENSION_NAME), nullptr,
                          -1, methods};

}  // namespace

// The operators: bnkit::batch_norm (statistics, the update of the running ones and the
// normalization with a fused activation in one call; stats holds the 5 * C values its
// backward reads: shift, shifted mean, 1 / std and the affine coefficients) and
// bnkit::batch_norm_backward, as aten's native_batch_norm and its backward. Their fake
// kernels are registered in Python (bnkit.kernels.express).
TORCH_LIBRARY_FRAGMENT(bnkit, m) {
    m.def(
        "batch_norm(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
        "Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, Tensor? mask, "
        "bool training, float momentum, float eps, bool unbiased, bool skip_nonfinite, "
        "int activation, float param, bool from_output) -> (Tensor, Tensor, Tensor)");
    m.def(
        "batch_norm_backward(Tensor grad_output, Tensor input, Tensor stats, Tensor? weight, "
        "Tensor? bias, Tensor? mask, bool training, int activation, float param, "
        "bool from_output, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(bnkit, CPU, m) {
    m.impl("batch_norm", &forward_cpu);
    m.impl("batch_norm_backward", &backward_cpu);
}

TORCH_LIBRARY_IMPL(bnkit, Autograd, m) { m.impl("batch_norm", &forward_autograd); }

PyMODINIT_FUNC BNKIT_JOIN(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&module_def); }
