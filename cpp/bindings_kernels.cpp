// _core.quantize / matvec / matmul / simd_paths: the kernels, for the writer, tests and benchmarks.
// Every argument is checked here so that no kernel reads out of bounds; computing releases the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include "upg/kernels.h"
#include "upg/threadpool.h"

namespace py = pybind11;
using upg::DType;

namespace {

template <class T>
using CArray = py::array_t<T, py::array::c_style>;  // exactly this dtype, C-contiguous
using FArray = py::array_t<float, py::array::c_style | py::array::forcecast>;
using Outliers = std::tuple<CArray<int32_t>, CArray<int32_t>, CArray<uint16_t>>;

const char* const kPaths[] = {"scalar", "avx2", "avx512"};  // worst to best

DType parse_type(const std::string& name) {
  for (int t = 0; t < upg::kNumDTypes; ++t)
    if (name == upg::dtype_name(DType(t)) && DType(t) != DType::I32) return DType(t);
  throw py::value_error("unknown tensor type '" + name + "' (f32, f16, bf16, q8_0, q4, q3, iq4_nl, iq4_xs, iq3)");
}

// Checks rows, cols and block against the type; returns the matrix's byte size.
uint64_t matrix_nbytes(DType type, int block, int64_t rows, int64_t cols) {
  if (rows <= 0 || cols <= 0 || rows > (int64_t(1) << 31) || cols > (int64_t(1) << 31))
    throw py::value_error("rows and cols must be in 1..2^31");
  if (!upg::is_quantized(type)) {
    if (block != 0) throw py::value_error(std::string(upg::dtype_name(type)) + " takes block 0");
    return uint64_t(rows) * uint64_t(cols) * uint64_t(upg::dense_elem_size(type));
  }
  if (const char* e = upg::quant_shape_error(type, uint64_t(cols), block))
    throw py::value_error(std::string(upg::dtype_name(type)) + " with " + std::to_string(cols) + " cols, block " +
                          std::to_string(block) + ": " + e);
  return upg::quant_sections(type, rows, cols, block).total();
}

const upg::Kernels& pick_path(const std::optional<std::string>& path) {
  if (!path) return upg::kernels();
  if (const upg::Kernels* k = upg::kernels_by_name(path->c_str())) return *k;
  throw py::value_error("kernel path '" + *path + "' is not built in or not supported by this CPU");
}

// A view over `data` after checking its size; outliers checked as docs/FORMAT.md requires.
upg::WeightView make_view(DType type, int block, const CArray<uint8_t>& data, int64_t rows, int64_t cols,
                          const std::optional<Outliers>& outliers) {
  const uint64_t nbytes = matrix_nbytes(type, block, rows, cols);
  if (data.ndim() != 1 || uint64_t(data.size()) != nbytes)
    throw py::value_error("data must be a 1-D uint8 array of " + std::to_string(nbytes) + " bytes");
  upg::WeightView w;
  w.type = type;
  w.block = upg::is_quantized(type) ? block : 0;
  w.rows = rows;
  w.cols = cols;
  w.codes = data.data();
  upg::set_sections(w);
  if (!outliers) return w;
  if (upg::has_grid(type)) throw py::value_error(std::string(upg::dtype_name(type)) + " carries no outliers (its grid has no 0)");
  const auto& [rowptr, col, val] = *outliers;
  if (rowptr.ndim() != 1 || rowptr.size() != rows + 1) throw py::value_error("outlier rowptr must be int32[rows + 1]");
  if (col.ndim() != 1 || val.ndim() != 1 || col.size() != val.size())
    throw py::value_error("outlier col (int32) and val (uint16) must be 1-D of equal length");
  const int32_t* rp = rowptr.data();
  const int32_t* c = col.data();
  if (rp[0] != 0 || rp[rows] != col.size()) throw py::value_error("outlier rowptr must run from 0 to nnz");
  for (int64_t r = 0; r < rows; ++r) {
    if (rp[r + 1] < rp[r]) throw py::value_error("outlier rowptr must be non-decreasing");
    for (int32_t i = rp[r]; i < rp[r + 1]; ++i)
      if (c[i] < 0 || c[i] >= cols || (i > rp[r] && c[i] <= c[i - 1]))
        throw py::value_error("outlier cols must lie in 0..cols-1, strictly increasing within a row");
  }
  w.o_rowptr = rp;
  w.o_col = c;
  w.o_val = val.data();
  return w;
}

bool is_f16(float v) { return std::isfinite(v) && upg::f16_to_f32(upg::f32_to_f16(v)) == v; }

// The given scales of quantize (scales_from, super_from) checked against what the bytes can hold:
// f16 values, and for iq4_xs / iq3 block scales that are their super-scale times an integer in
// [-32, 31] (the product as float32, as block_scales computes it). The shape is valid for the type.
void check_given_scales(DType type, int block, int64_t rows, int64_t cols, const std::optional<FArray>& scales_from,
                        const std::optional<FArray>& super_from) {
  if (!scales_from) {
    if (super_from) throw py::value_error("super_from needs scales_from");
    return;
  }
  if (!upg::is_quantized(type)) throw py::value_error("scales_from applies to quantized types only");
  const int64_t nb = cols / block, ns = cols / UPG_SUPER_BLOCK;
  if (scales_from->ndim() != 2 || scales_from->shape(0) != rows || scales_from->shape(1) != nb)
    throw py::value_error("scales_from must be float32 [rows, cols / block] = [" + std::to_string(rows) + ", " +
                          std::to_string(nb) + "]");
  const float* sc = scales_from->data();
  const auto at = [](int64_t r, int64_t b) { return "[" + std::to_string(r) + ", " + std::to_string(b) + "]"; };
  if (!upg::has_super_block(type)) {
    if (super_from) throw py::value_error(std::string("super_from applies to iq4_xs and iq3, not ") + upg::dtype_name(type));
    for (int64_t i = 0; i < rows * nb; ++i)
      if (!is_f16(sc[i])) throw py::value_error("scales_from" + at(i / nb, i % nb) + " = " + std::to_string(sc[i]) +
                                                " is not an f16 value");
    return;
  }
  if (!super_from) throw py::value_error(std::string(upg::dtype_name(type)) + " needs super_from with scales_from");
  if (super_from->ndim() != 2 || super_from->shape(0) != rows || super_from->shape(1) != ns)
    throw py::value_error("super_from must be float32 [rows, cols / 256] = [" + std::to_string(rows) + ", " +
                          std::to_string(ns) + "]");
  const float* d = super_from->data();
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t b = 0; b < nb; ++b) {
      const float ds = d[r * ns + b * block / UPG_SUPER_BLOCK], s = sc[r * nb + b];
      if (!is_f16(ds)) throw py::value_error("super_from" + at(r, b * block / UPG_SUPER_BLOCK) + " = " +
                                             std::to_string(ds) + " is not an f16 value");
      const float l = ds == 0.0f ? 0.0f : std::nearbyint(s / ds);
      if (!(l >= -UPG_SUB_SCALE_BIAS && l < UPG_SUB_SCALE_BIAS && l * ds == s))
        throw py::value_error("scales_from" + at(r, b) + " = " + std::to_string(s) + " is not its super-scale " +
                              std::to_string(ds) + " times an integer in [-32, 31]");
    }
}

py::array_t<uint8_t> quantize(const std::string& type_name, int block, const FArray& src, int n_threads,
                              const std::optional<FArray>& importance, const std::optional<FArray>& codes_from,
                              const std::optional<FArray>& scales_from, const std::optional<FArray>& super_from) {
  const DType type = parse_type(type_name);
  if (src.ndim() != 2) throw py::value_error("w must be a 2-D float32 array");
  const int64_t rows = src.shape(0), cols = src.shape(1);
  const float* xc = nullptr;
  if (codes_from) {
    if (!upg::is_quantized(type)) throw py::value_error("codes_from applies to quantized types only");
    if (codes_from->ndim() != 2 || codes_from->shape(0) != rows || codes_from->shape(1) != cols)
      throw py::value_error("codes_from must have the shape of w");
    xc = codes_from->data();
  }
  const uint64_t nbytes = matrix_nbytes(type, block, rows, cols);
  check_given_scales(type, block, rows, cols, scales_from, super_from);
  const float* given = scales_from ? scales_from->data() : nullptr;
  const float* given_super = super_from ? super_from->data() : nullptr;
  const float* imp = nullptr;
  if (importance && upg::is_quantized(type)) {
    if (importance->ndim() != 1 || importance->shape(0) != cols)
      throw py::value_error("importance must be a 1-D array of " + std::to_string(cols) + " values (one per column of w)");
    imp = importance->data();
    for (int64_t c = 0; c < cols; ++c)
      if (!(std::isfinite(imp[c]) && imp[c] >= 0.0f))
        throw py::value_error("importance must be finite and >= 0 (column " + std::to_string(c) + " is " +
                              std::to_string(imp[c]) + ")");
  }
  if (n_threads < 0) throw py::value_error("n_threads must be >= 0");
  if (n_threads == 0) n_threads = int(std::max(1u, std::thread::hardware_concurrency()));
  n_threads = int(std::min<int64_t>(n_threads, rows));
  py::array_t<uint8_t> out(static_cast<py::ssize_t>(nbytes));
  uint8_t* o = out.mutable_data();
  const float* x = src.data();
  bool finite = true;
  {
    py::gil_scoped_release release;
    // Codes of non-finite inputs are meaningless (and casting NaN to int is undefined).
    if (upg::is_quantized(type))
      for (int64_t i = 0; i < rows * cols && finite; ++i) finite = std::isfinite(x[i]) && (!xc || std::isfinite(xc[i]));
    if (finite) {
      std::memset(o, 0, nbytes);  // section padding
      std::vector<std::thread> pool;
      for (int t = 0; t < n_threads; ++t)
        pool.emplace_back(upg::quantize_rows, type, block, x, rows, cols, o, rows * t / n_threads,
                          rows * (t + 1) / n_threads, imp, xc, given, given_super);
      for (auto& th : pool) th.join();
    }
  }
  if (!finite) throw py::value_error("w has non-finite values; they cannot be quantized");
  return out;
}

// x [n][w.cols] quantized to 8 bits by path k when w's type multiplies such activations.
struct QuantizedInput {
  std::vector<int8_t> q;
  std::vector<float> d;
  std::vector<int32_t> sum;
  upg::ActQ8 view;
  QuantizedInput(const upg::Kernels& k, const upg::WeightView& w, const float* x, int64_t n) {
    if (!upg::is_quantized(w.type)) return;
    const int64_t nb = w.cols / w.block;
    q.resize(size_t(n * w.cols));
    d.resize(size_t(n * nb));
    sum.resize(size_t(n * nb));
    k.quantize_act(x, n * w.cols, w.block, q.data(), d.data(), sum.data());  // rows: whole blocks
    view = {w.block, q.data(), d.data(), sum.data()};
  }
};

// The output rows [r0, r1) to compute (r1 None = rows); the others are left NaN.
std::pair<int64_t, int64_t> row_range(int64_t rows, int64_t r0, std::optional<int64_t> r1) {
  const int64_t end = r1.value_or(rows);
  if (r0 < 0 || r0 > end || end > rows) throw py::value_error("need 0 <= r0 <= r1 <= rows");
  return {r0, end};
}

template <class A>
void fill_nan_if_partial(A& y, int64_t rows, std::pair<int64_t, int64_t> range) {
  if (range.first != 0 || range.second != rows)
    std::fill_n(y.mutable_data(), y.size(), std::numeric_limits<float>::quiet_NaN());
}

void check_sharing(int n_threads, int64_t chunk_rows) {
  if (n_threads < 1) throw py::value_error("n_threads must be >= 1");
  if (chunk_rows < 0 || chunk_rows % 16) throw py::value_error("chunk_rows must be 0 (the engine's choice) or a multiple of 16");
}

// Rows [range) computed by f(r0, r1) over chunks, n_threads sharing them as the engine does
// (chunk_rows 0: the engine's matmul_chunk_rows).
template <class F>
void share_rows(const upg::WeightView& w, int64_t n, std::pair<int64_t, int64_t> range, int n_threads,
                int64_t chunk_rows, F&& f) {
  upg::ThreadPool pool(n_threads);
  const int64_t chunk = chunk_rows ? chunk_rows : upg::matmul_chunk_rows(w, n, n_threads);
  pool.parallel_for(range.second - range.first, chunk,
                    [&](int64_t a, int64_t b) { f(range.first + a, range.first + b); });
}

py::array_t<float> matvec(const std::string& type_name, int block, const CArray<uint8_t>& data, int64_t rows,
                          int64_t cols, const FArray& x, const std::optional<std::string>& path,
                          const std::optional<Outliers>& outliers, int64_t r0, std::optional<int64_t> r1,
                          int n_threads, int64_t chunk_rows) {
  const upg::WeightView w = make_view(parse_type(type_name), block, data, rows, cols, outliers);
  const bool tokens = x.ndim() == 2;  // generated tokens of one pass: matvec_n
  if (!(x.ndim() == 1 && x.size() == cols) && !(tokens && x.shape(1) == cols))
    throw py::value_error("x must be float32[cols] or float32[n, cols]");
  check_sharing(n_threads, chunk_rows);
  const int64_t n = tokens ? x.shape(0) : 1;
  const auto range = row_range(rows, r0, r1);
  const upg::Kernels& k = pick_path(path);
  py::array_t<float> y = tokens ? py::array_t<float>({static_cast<py::ssize_t>(n), static_cast<py::ssize_t>(rows)})
                                : py::array_t<float>(static_cast<py::ssize_t>(rows));
  fill_nan_if_partial(y, rows, range);
  float* yp = y.mutable_data();
  const float* xp = x.data();
  {
    py::gil_scoped_release release;
    const QuantizedInput xq(k, w, xp, n);
    share_rows(w, 1, range, n_threads, chunk_rows, [&](int64_t a, int64_t b) {
      if (tokens) k.matvec_n(w, xp, xq.view, n, yp, rows, a, b);
      else k.matvec(w, xp, xq.view, yp, a, b);
    });
  }
  return y;
}

py::array_t<float> matmul(const std::string& type_name, int block, const CArray<uint8_t>& data, int64_t rows,
                          int64_t cols, const FArray& x, const std::optional<std::string>& path,
                          const std::optional<Outliers>& outliers, int64_t r0, std::optional<int64_t> r1,
                          int n_threads, int64_t chunk_rows) {
  const upg::WeightView w = make_view(parse_type(type_name), block, data, rows, cols, outliers);
  if (x.ndim() != 2 || x.shape(1) != cols) throw py::value_error("x must be float32[n, cols]");
  check_sharing(n_threads, chunk_rows);
  const int64_t n = x.shape(0);
  const auto range = row_range(rows, r0, r1);
  const upg::Kernels& k = pick_path(path);
  py::array_t<float> y({static_cast<py::ssize_t>(n), static_cast<py::ssize_t>(rows)});
  fill_nan_if_partial(y, rows, range);
  float* yp = y.mutable_data();
  const float* xp = x.data();
  {
    py::gil_scoped_release release;
    const QuantizedInput xq(k, w, xp, n);
    share_rows(w, n, range, n_threads, chunk_rows,
               [&](int64_t a, int64_t b) { k.matmul(w, xp, xq.view, n, yp, rows, a, b); });
  }
  return y;
}

// Decode's mat-vec as the engine runs it, for benchmarks: `data` holds `copies` matrices of one
// type and shape back to back (more than the caches hold, so that they stream from memory as a
// model's weights do), and each pass multiplies x by every one in turn, n_threads sharing each
// product through the engine's ThreadPool::parallel_for (chunk_rows 0: the engine's
// matmul_chunk_rows). Returns the seconds per product of each pass after one warm-up pass.
std::vector<double> time_matvec(const std::string& type_name, int block, const CArray<uint8_t>& data, int64_t rows,
                                int64_t cols, int64_t copies, const FArray& x, const std::optional<std::string>& path,
                                int n_threads, int passes, int64_t chunk_rows) {
  const DType type = parse_type(type_name);
  const uint64_t nbytes = matrix_nbytes(type, block, rows, cols);
  if (copies < 1 || data.ndim() != 1 || uint64_t(data.size()) != nbytes * uint64_t(copies))
    throw py::value_error("data must be a 1-D uint8 array of copies x the matrix's bytes");
  if (x.ndim() != 1 || x.size() != cols) throw py::value_error("x must be float32[cols]");
  check_sharing(n_threads, chunk_rows);
  if (passes < 1) throw py::value_error("passes must be >= 1");
  const upg::Kernels& k = pick_path(path);
  std::vector<upg::WeightView> views;
  for (int64_t c = 0; c < copies; ++c) {
    const CArray<uint8_t> one(static_cast<py::ssize_t>(nbytes), data.data() + c * int64_t(nbytes), data);
    views.push_back(make_view(type, block, one, rows, cols, std::nullopt));
  }
  std::vector<float> y(static_cast<size_t>(rows));
  std::vector<double> out;
  py::gil_scoped_release release;
  const QuantizedInput xq(k, views[0], x.data(), 1);
  upg::ThreadPool pool(n_threads);
  const int64_t chunk = chunk_rows ? chunk_rows : upg::matmul_chunk_rows(views[0], 1, n_threads);
  for (int p = 0; p <= passes; ++p) {
    const auto t0 = std::chrono::steady_clock::now();
    for (const upg::WeightView& w : views)
      pool.parallel_for(rows, chunk, [&](int64_t r0, int64_t r1) { k.matvec(w, x.data(), xq.view, y.data(), r0, r1); });
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (p > 0) out.push_back(s / double(copies));
  }
  return out;
}

// (codes int8[n], scales float32[n / block]) of a float32[n] row, by one path.
std::pair<py::array_t<int8_t>, py::array_t<float>> quantize_act(const FArray& x, int block,
                                                               const std::optional<std::string>& path) {
  if (block != 32 && block != 64) throw py::value_error("block must be 32 or 64");
  if (x.ndim() != 1 || x.size() % block != 0) throw py::value_error("x must be float32[n], n a multiple of block");
  const upg::Kernels& k = pick_path(path);
  const int64_t n = x.size();
  py::array_t<int8_t> q(static_cast<py::ssize_t>(n));
  py::array_t<float> d(static_cast<py::ssize_t>(n / block));
  std::vector<int32_t> sum(size_t(n / block));
  k.quantize_act(x.data(), n, block, q.mutable_data(), d.mutable_data(), sum.data());
  const int8_t* qp = q.data();
  for (int64_t b = 0; b < n / block; ++b) {  // the sums are internal; they must agree with the codes
    int32_t s = 0;
    for (int j = 0; j < block; ++j) s += qp[b * block + j];
    if (s != sum[size_t(b)]) throw std::logic_error("quantize_act: block sum disagrees with its codes");
  }
  return {q, d};
}

// (e^(x - shift), its sum) and silu(g) * u by one path: the softmax and MLP helpers.
std::pair<py::array_t<float>, float> exp_shift_sum(const FArray& x, float shift, const std::optional<std::string>& path) {
  if (x.ndim() != 1) throw py::value_error("x must be float32[n]");
  py::array_t<float> y(x.size());
  std::copy_n(x.data(), x.size(), y.mutable_data());
  const float sum = pick_path(path).exp_shift_sum(y.mutable_data(), x.size(), shift);
  return {y, sum};
}

py::array_t<float> silu_mul(const FArray& g, const FArray& u, const std::optional<std::string>& path) {
  if (g.ndim() != 1 || u.ndim() != 1 || g.size() != u.size()) throw py::value_error("g and u must be float32[n]");
  py::array_t<float> out(g.size());
  pick_path(path).silu_mul(g.data(), u.data(), out.mutable_data(), g.size());
  return out;
}

std::vector<std::string> simd_paths() {
  std::vector<std::string> out;
  for (const char* p : kPaths)
    if (upg::kernels_by_name(p)) out.emplace_back(p);
  return out;
}

// The float32 [rows, cols] values a UPG matrix encodes (the engine's own decoder, as get_rows uses).
py::array_t<float> dequantize(const std::string& type_name, int block, const CArray<uint8_t>& data, int64_t rows,
                              int64_t cols) {
  const upg::WeightView w = make_view(parse_type(type_name), block, data, rows, cols, std::nullopt);
  py::array_t<float> out({rows, cols});
  float* o = out.mutable_data();
  const upg::Kernels& k = upg::kernels();
  py::gil_scoped_release release;
  for (int64_t r = 0; r < rows; ++r) k.dequant_row(w, r, o + r * cols);
  return out;
}

// The scale of every block of a quantized matrix's bytes, float32 [rows, cols / block].
py::array_t<float> block_scales(const std::string& type_name, int block, const CArray<uint8_t>& data, int64_t rows,
                                int64_t cols) {
  const DType type = parse_type(type_name);
  if (!upg::is_quantized(type)) throw py::value_error(type_name + " has no block scales");
  const upg::WeightView w = make_view(type, block, data, rows, cols, std::nullopt);
  py::array_t<float> out({rows, cols / block});
  upg::block_scales(type, block, w.codes, rows, cols, out.mutable_data());
  return out;
}

py::array_t<float> super_scales(const std::string& type_name, const CArray<uint8_t>& data, int64_t rows,
                                int64_t cols) {
  const DType type = parse_type(type_name);
  if (!upg::has_super_block(type)) throw py::value_error(type_name + " has no super-scales");
  const upg::WeightView w = make_view(type, 32, data, rows, cols, std::nullopt);
  py::array_t<float> out({rows, cols / UPG_SUPER_BLOCK});
  upg::super_scales(type, w.codes, rows, cols, out.mutable_data());
  return out;
}

py::array_t<float> round_to_type(const std::string& type_name, const FArray& x, const FArray& scale) {
  const DType type = parse_type(type_name);
  if (!upg::is_quantized(type)) throw py::value_error(type_name + " is not a quantized type");
  if (x.ndim() != scale.ndim() || !std::equal(x.shape(), x.shape() + x.ndim(), scale.shape()))
    throw py::value_error("x and scale must have the same shape");
  const float* xp = x.data();
  const float* sp = scale.data();
  for (py::ssize_t i = 0; i < x.size(); ++i)
    if (!std::isfinite(xp[i]) || !std::isfinite(sp[i])) throw py::value_error("x and scale must be finite");
  py::array_t<float> out(std::vector<py::ssize_t>(x.shape(), x.shape() + x.ndim()));
  upg::round_to_type(type, xp, sp, x.size(), out.mutable_data());
  return out;
}

}  // namespace

void bind_kernels(py::module_& m) {
  using namespace pybind11::literals;
  m.attr("SUPER_BLOCK") = UPG_SUPER_BLOCK;        // iq4_xs, iq3: elements per f16 super-scale
  m.attr("SUB_SCALE_BIAS") = UPG_SUB_SCALE_BIAS;  // iq4_xs, iq3: block scale = super-scale * (ls - 32)
  m.def("quantize", &quantize, "type"_a, "block"_a, "w"_a, "n_threads"_a = 0, "importance"_a = py::none(),
        "codes_from"_a = py::none(), "scales_from"_a = py::none(), "super_from"_a = py::none(),
        "Quantize (or convert) a float32 [rows, cols] matrix to its UPG bytes (docs/FORMAT.md). importance: "
        "float32 [cols] per-column weights (>= 0) of the scale search of quantized types; None: the plain scale. "
        "codes_from: float32 [rows, cols]: the codes are those of codes_from under the scales chosen for w (GPTQ). "
        "scales_from: float32 [rows, cols / block] f16 values: store these block scales instead of searching them "
        "(as block_scales returns them); iq4_xs / iq3 also take super_from, float32 [rows, cols / 256] f16 "
        "super-scales (as super_scales returns them), every block scale being its super-scale times an integer "
        "in [-32, 31].");
  m.def("block_scales", &block_scales, "type"_a, "block"_a, "data"_a, "rows"_a, "cols"_a,
        "The scale each block of a quantized matrix's bytes applies to its grid: float32 [rows, cols / block] "
        "(iq4_xs / iq3: the super-scale times the sub-block's ls - 32).");
  m.def("super_scales", &super_scales, "type"_a, "data"_a, "rows"_a, "cols"_a,
        "The f16 super-scales of an iq4_xs / iq3 matrix's bytes: float32 [rows, cols / 256].");
  m.def("round_to_type", &round_to_type, "type"_a, "x"_a, "scale"_a,
        "x rounded as the quantized type rounds it under scale (elementwise, same shapes): the value it decodes to.");
  m.def("dequantize", &dequantize, "type"_a, "block"_a, "data"_a, "rows"_a, "cols"_a,
        "The float32 [rows, cols] matrix that a UPG matrix's bytes encode.");
  m.def("matvec", &matvec, "type"_a, "block"_a, "data"_a, "rows"_a, "cols"_a, "x"_a, "path"_a = py::none(),
        "outliers"_a = py::none(), py::kw_only(), "r0"_a = 0, "r1"_a = py::none(), "n_threads"_a = 1,
        "chunk_rows"_a = 0,
        "y = W x for a UPG matrix; path None uses the engine's choice (UPG_SIMD or the best). Only "
        "rows [r0, r1) are computed, the others are NaN; n_threads share them in chunks of chunk_rows "
        "as the engine does (0: the engine's chunk). x float32[n, cols]: the decode of n tokens at once "
        "(matvec_n), y float32[n, rows].");
  m.def("matmul", &matmul, "type"_a, "block"_a, "data"_a, "rows"_a, "cols"_a, "x"_a, "path"_a = py::none(),
        "outliers"_a = py::none(), py::kw_only(), "r0"_a = 0, "r1"_a = py::none(), "n_threads"_a = 1,
        "chunk_rows"_a = 0,
        "y[t] = W x[t] for every row t of x: float32[n, rows] (rows [r0, r1) only, as matvec).");
  m.def("time_matvec", &time_matvec, "type"_a, "block"_a, "data"_a, "rows"_a, "cols"_a, "copies"_a, "x"_a,
        "path"_a = py::none(), py::kw_only(), "n_threads"_a = 1, "passes"_a = 5, "chunk_rows"_a = 0,
        "Seconds per decode mat-vec of each pass over `copies` matrices, n_threads sharing each as the engine does.");
  m.def("quantize_act", &quantize_act, "x"_a, "block"_a, "path"_a = py::none(),
        "The 8-bit activations that quantized weights multiply (kernels.h): (codes, scales).");
  m.def("exp_shift_sum", &exp_shift_sum, "x"_a, "shift"_a, "path"_a = py::none(),
        "(e^(x - shift), its sum): the softmax step of attention.");
  m.def("silu_mul", &silu_mul, "g"_a, "u"_a, "path"_a = py::none(), "silu(g) * u: the MLP activation.");
  m.def("simd_paths", &simd_paths, "Kernel paths this build and CPU run, best last.");
}
