#include "upg/format.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstring>

namespace upg {
namespace {

constexpr uint32_t kMaxNameLen = 512;

// Reads little-endian integers from a bounded range; running past the end is a FormatError.
class Cursor {
 public:
  Cursor(const uint8_t* p, uint64_t n, const char* what) : p_(p), n_(n), what_(what) {}
  template <typename T>
  T get(const char* field) {
    need(sizeof(T), field);
    T v;
    std::memcpy(&v, p_ + pos_, sizeof(T));  // the format is little-endian, as every target is
    pos_ += sizeof(T);
    return v;
  }
  std::string bytes(uint64_t n, const char* field) {
    need(n, field);
    std::string s(reinterpret_cast<const char*>(p_ + pos_), n);
    pos_ += n;
    return s;
  }
  uint64_t pos() const { return pos_; }

 private:
  void need(uint64_t k, const char* field) {
    if (k > n_ - pos_)
      throw FormatError(std::string(what_) + " ends inside " + field + " at byte " + std::to_string(pos_));
  }
  const uint8_t* p_;
  uint64_t n_, pos_ = 0;
  const char* what_;
};

bool valid_utf8(const std::string& s) {
  size_t i = 0;
  while (i < s.size()) {
    const unsigned char c = s[i];
    int extra = c < 0x80 ? 0 : (c >> 5) == 6 ? 1 : (c >> 4) == 14 ? 2 : (c >> 3) == 30 ? 3 : -1;
    if (extra < 0 || (extra > 0 && i + extra >= s.size())) return false;
    for (int k = 1; k <= extra; ++k)
      if ((static_cast<unsigned char>(s[i + k]) >> 6) != 2) return false;
    i += extra + 1;
  }
  return true;
}

// True when s is one JSON object (RFC 8259 syntax), checked without recursion so that deeply
// nested input cannot exhaust the stack.
bool is_json_object(const std::string& s) {
  size_t i = 0;
  auto ws = [&] { while (i < s.size() && (s[i] == ' ' || s[i] == '\t' || s[i] == '\n' || s[i] == '\r')) ++i; };
  auto literal = [&](const char* w) {
    const size_t n = std::strlen(w);
    if (s.compare(i, n, w) != 0) return false;
    i += n;
    return true;
  };
  auto string = [&] {
    if (i >= s.size() || s[i] != '"') return false;
    for (++i; i < s.size(); ++i) {
      const unsigned char c = s[i];
      if (c == '"') { ++i; return true; }
      if (c < 0x20) return false;
      if (c == '\\') {
        if (++i >= s.size()) return false;
        if (s[i] == 'u') {
          for (int k = 0; k < 4; ++k)
            if (++i >= s.size() || !std::isxdigit(static_cast<unsigned char>(s[i]))) return false;
        } else if (!std::strchr("\"\\/bfnrt", s[i]) || s[i] == '\0') {
          return false;
        }
      }
    }
    return false;
  };
  auto number = [&] {
    const size_t start = i;
    if (i < s.size() && s[i] == '-') ++i;
    auto digits = [&] { const size_t b = i; while (i < s.size() && std::isdigit(static_cast<unsigned char>(s[i]))) ++i; return i > b; };
    if (i < s.size() && s[i] == '0') ++i;
    else if (!digits()) return false;
    if (i < s.size() && s[i] == '.') { ++i; if (!digits()) return false; }
    if (i < s.size() && (s[i] == 'e' || s[i] == 'E')) {
      ++i;
      if (i < s.size() && (s[i] == '+' || s[i] == '-')) ++i;
      if (!digits()) return false;
    }
    return i > start;
  };

  std::vector<char> stack;  // open containers: '{' or '['
  ws();
  if (i >= s.size() || s[i] != '{') return false;
  bool want_value = true;   // at a value position (after '[', ':' or ',')
  while (true) {
    ws();
    if (i >= s.size()) return false;
    if (want_value) {
      const char c = s[i];
      if (c == '{' || c == '[') {
        if (stack.size() >= 1000) return false;
        stack.push_back(c);
        ++i;
        ws();
        if (i < s.size() && s[i] == (c == '{' ? '}' : ']')) { ++i; stack.pop_back(); want_value = false; }
        else if (c == '{') { if (!string()) return false; ws(); if (i >= s.size() || s[i++] != ':') return false; }
        if (stack.empty()) break;
        continue;
      }
      const size_t at = i;
      auto from_here = [&](auto parse) { i = at; return parse(); };  // each alternative starts afresh
      if (!(from_here(string) || from_here(number) || literal("true") || literal("false") || literal("null")))
        return false;
      want_value = false;
      continue;
    }
    // after a value: ',' or the closing bracket of the innermost container
    const char c = s[i++];
    if (c == ',') {
      if (stack.back() == '{') { ws(); if (!string()) return false; ws(); if (i >= s.size() || s[i++] != ':') return false; }
      want_value = true;
    } else if (c == (stack.back() == '{' ? '}' : ']')) {
      stack.pop_back();
      if (stack.empty()) break;
    } else {
      return false;
    }
  }
  ws();
  return i == s.size();
}

// Product of dims, or 0 on overflow past 2^62 elements.
uint64_t element_count(const std::vector<uint64_t>& dims) {
  uint64_t n = 1;
  for (uint64_t d : dims) {
    if (d == 0 || n > (uint64_t(1) << 62) / d) return 0;
    n *= d;
  }
  return n;
}

std::string shape_str(const std::vector<uint64_t>& dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

uint32_t crc_table[8][256];
struct CrcInit {
  CrcInit() {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      crc_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; ++i)
      for (int t = 1; t < 8; ++t) crc_table[t][i] = (crc_table[t - 1][i] >> 8) ^ crc_table[0][crc_table[t - 1][i] & 0xff];
  }
} crc_init;

}  // namespace

uint32_t crc32(const uint8_t* p, uint64_t n, uint32_t crc) {
  crc = ~crc;
  while (n >= 8) {  // slicing-by-8
    uint32_t a, b;
    std::memcpy(&a, p, 4);
    std::memcpy(&b, p + 4, 4);
    a ^= crc;
    crc = crc_table[7][a & 0xff] ^ crc_table[6][(a >> 8) & 0xff] ^ crc_table[5][(a >> 16) & 0xff] ^
          crc_table[4][a >> 24] ^ crc_table[3][b & 0xff] ^ crc_table[2][(b >> 8) & 0xff] ^
          crc_table[1][(b >> 16) & 0xff] ^ crc_table[0][b >> 24];
    p += 8;
    n -= 8;
  }
  while (n--) crc = crc_table[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
  return ~crc;
}

MappedFile::MappedFile(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw FormatError("cannot open " + path + ": " + std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw FormatError(path + " is not a regular file");
  }
  size_ = uint64_t(st.st_size);
  if (size_ < kPreambleSize) {
    ::close(fd);
    throw FormatError(path + " is too small to be a UPG file (" + std::to_string(size_) + " bytes)");
  }
  void* p = ::mmap(nullptr, size_, PROT_READ, MAP_SHARED, fd, 0);
  ::close(fd);
  if (p == MAP_FAILED) throw FormatError("cannot map " + path + ": " + std::strerror(errno));
  data_ = static_cast<const uint8_t*>(p);
#ifdef MADV_HUGEPAGE
  // Pages the kernel reads in for this mapping come in 2 MiB folios where the file system allows,
  // and map as huge pages: decode streams every weight each token, and with 4 KiB pages a
  // Phi-4-sized model takes two million TLB misses a token. Advice only: ignored where unsupported.
  ::madvise(p, size_, MADV_HUGEPAGE);
#endif
}

MappedFile::~MappedFile() {
  if (data_) ::munmap(const_cast<uint8_t*>(data_), size_);
}

UPGFile::UPGFile(const std::string& path) : map_(path), path_(path) { parse(); }

void UPGFile::parse() {
  const uint64_t fsize = map_.size();
  Cursor pre(map_.data(), kPreambleSize, "preamble");
  if (std::memcmp(map_.data(), kMagic, 8) != 0) throw FormatError(path_ + ": bad magic, not a UPG file");
  pre.bytes(8, "magic");
  const uint32_t version = pre.get<uint32_t>("version");
  if (version < 1 || version > kVersion)
    throw FormatError("unsupported UPG version " + std::to_string(version) + " (this reader knows 1.." +
                      std::to_string(kVersion) + ")");
  if (pre.get<uint32_t>("flags") != 0) throw FormatError("preamble flags must be 0");
  const uint64_t header_off = pre.get<uint64_t>("header_offset");
  const uint64_t header_size = pre.get<uint64_t>("header_size");
  const uint64_t dir_off = pre.get<uint64_t>("directory_offset");
  const uint64_t dir_size = pre.get<uint64_t>("directory_size");
  data_offset_ = pre.get<uint64_t>("data_offset");
  data_size_ = pre.get<uint64_t>("data_size");

  if (header_off != kPreambleSize) throw FormatError("header_offset must be 64");
  if (header_size > fsize - header_off) throw FormatError("header_size runs past the end of the file");
  if (dir_off != header_off + header_size) throw FormatError("directory_offset must follow the header");
  if (dir_size > fsize - dir_off) throw FormatError("directory_size runs past the end of the file");
  if (data_offset_ % kDataAlign || data_size_ % kDataAlign) throw FormatError("data section is not 16 KiB aligned");
  if (data_offset_ < dir_off + dir_size) throw FormatError("data section overlaps the directory");
  if (data_offset_ > fsize || data_size_ != fsize - data_offset_)
    throw FormatError("data_offset + data_size (" + std::to_string(data_offset_) + " + " + std::to_string(data_size_) +
                      ") does not match the file size " + std::to_string(fsize) + " (truncated file?)");

  header_.assign(reinterpret_cast<const char*>(map_.data() + header_off), header_size);
  if (!valid_utf8(header_) || !is_json_object(header_)) throw FormatError("header is not a UTF-8 JSON object");

  Cursor dir(map_.data() + dir_off, dir_size, "directory");
  const uint32_t count = dir.get<uint32_t>("tensor count");
  if (count > dir_size / 24) throw FormatError("tensor count " + std::to_string(count) + " exceeds what the directory can hold");
  tensors_.reserve(count);
  for (uint32_t i = 0; i < count; ++i) {
    TensorInfo t;
    const uint16_t name_len = dir.get<uint16_t>("name length");
    if (name_len == 0 || name_len > kMaxNameLen) throw FormatError("tensor #" + std::to_string(i) + ": bad name length");
    t.name = dir.bytes(name_len, "tensor name");
    if (!valid_utf8(t.name)) throw FormatError("tensor #" + std::to_string(i) + ": name is not UTF-8");
    const std::string where = "tensor '" + t.name + "': ";
    const uint8_t dtype = dir.get<uint8_t>("dtype");
    if (dtype >= kNumDTypes)
      throw FormatError(where + "unknown dtype " + std::to_string(dtype) + " (this reader knows 0.." +
                        std::to_string(kNumDTypes - 1) + "; a newer upg_backend may read it)");
    t.dtype = DType(dtype);
    if (dtype_version(t.dtype) > version)
      throw FormatError(where + "dtype " + dtype_name(t.dtype) + " needs format version " +
                        std::to_string(dtype_version(t.dtype)) + ", the file says " + std::to_string(version));
    const uint8_t ndim = dir.get<uint8_t>("ndim");
    if (ndim < 1 || ndim > 4) throw FormatError(where + "ndim " + std::to_string(ndim) + " not in 1..4");
    t.block = dir.get<uint16_t>("block");
    for (int d = 0; d < ndim; ++d) t.dims.push_back(dir.get<uint64_t>("dims"));
    t.offset = dir.get<uint64_t>("offset");
    t.nbytes = dir.get<uint64_t>("nbytes");
    t.crc32 = dir.get<uint32_t>("crc32");

    const uint64_t n = element_count(t.dims);
    if (n == 0) throw FormatError(where + "bad dims " + shape_str(t.dims));
    uint64_t expect;
    if (is_quantized(t.dtype)) {
      if (ndim != 2) throw FormatError(where + "quantized tensors must be 2-D");
      if (const char* e = quant_shape_error(t.dtype, t.dims[1], t.block))
        throw FormatError(where + dtype_name(t.dtype) + " [" + std::to_string(t.dims[0]) + ", " +
                          std::to_string(t.dims[1]) + "] block " + std::to_string(t.block) + ": " + e);
      expect = quant_sections(t.dtype, t.dims[0], t.dims[1], t.block).total();
    } else {
      if (t.block != 0) throw FormatError(where + "block must be 0 for " + dtype_name(t.dtype));
      if (t.dtype == DType::I32 && ndim != 1) throw FormatError(where + "i32 tensors must be 1-D");
      expect = n * dense_elem_size(t.dtype);
    }
    if (t.nbytes != expect)
      throw FormatError(where + "nbytes " + std::to_string(t.nbytes) + " does not match " + dtype_name(t.dtype) + " " +
                        shape_str(t.dims) + " (" + std::to_string(expect) + ")");
    if (t.offset % kTensorAlign) throw FormatError(where + "offset is not 64-byte aligned");
    if (t.offset > data_size_ || t.nbytes > data_size_ - t.offset) throw FormatError(where + "data lies outside the data section");
    if (!index_.emplace(t.name, tensors_.size()).second) throw FormatError(where + "duplicate name");
    tensors_.push_back(std::move(t));
  }
  if (dir.pos() != dir_size) throw FormatError("directory has " + std::to_string(dir_size - dir.pos()) + " trailing bytes");

  for (size_t i = 0; i < tensors_.size(); ++i) by_offset_.push_back(i);
  std::sort(by_offset_.begin(), by_offset_.end(), [&](size_t a, size_t b) { return tensors_[a].offset < tensors_[b].offset; });
  for (size_t i = 1; i < by_offset_.size(); ++i) {
    const TensorInfo &a = tensors_[by_offset_[i - 1]], &b = tensors_[by_offset_[i]];
    if (a.offset + a.nbytes > b.offset) throw FormatError("tensors '" + a.name + "' and '" + b.name + "' overlap");
  }
  directory_end_ = dir_off + dir_size;
  content_id_ = 14695981039346656037ull;  // FNV-1a over the directory's bytes, then the data size
  const auto mix = [&](uint8_t b) { content_id_ = (content_id_ ^ b) * 1099511628211ull; };
  for (uint64_t i = dir_off; i < directory_end_; ++i) mix(map_.data()[i]);
  for (int i = 0; i < 8; ++i) mix(uint8_t(data_size_ >> (8 * i)));
}

const TensorInfo* UPGFile::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

namespace {
// Throws unless the file bytes [begin, end) are all zero; `where` names the gap.
void check_zero(const uint8_t* file, uint64_t begin, uint64_t end, const std::string& where) {
  for (uint64_t i = begin; i < end; ++i)
    if (file[i]) throw FormatError("non-zero byte at file offset " + std::to_string(i) + " " + where + " (corrupted file)");
}
}  // namespace

void UPGFile::verify() const {
  const uint64_t page = uint64_t(sysconf(_SC_PAGESIZE));
  const uint8_t* file = map_.data();
  check_zero(file, directory_end_, data_offset_, "in the padding after the directory");
  uint64_t end = 0;  // of the previous tensor, relative to the data section
  const TensorInfo* prev = nullptr;
  for (size_t i : by_offset_) {
    const TensorInfo& t = tensors_[i];
    check_zero(file, data_offset_ + end, data_offset_ + t.offset,
               prev ? "between tensors '" + prev->name + "' and '" + t.name + "'" : "before the first tensor '" + t.name + "'");
    if (crc32(data(t), t.nbytes) != t.crc32) throw FormatError("tensor '" + t.name + "': crc32 mismatch (corrupted data)");
    // Unmap the pages just read (they stay in the page cache), so checking a file larger than
    // memory allows keeps this process's resident set to about one tensor.
    const uint64_t first = (data_offset_ + end) / page * page;
    end = t.offset + t.nbytes;
    ::madvise(const_cast<uint8_t*>(file) + first, data_offset_ + end - first, MADV_DONTNEED);
    prev = &t;
  }
  check_zero(file, data_offset_ + end, map_.size(),
             prev ? "in the padding after the last tensor '" + prev->name + "'" : "in the empty data section");
}

const float* UPGFile::vector_f32(const std::string& name, uint64_t n) const {
  const TensorInfo* t = find(name);
  if (!t) throw FormatError("missing tensor '" + name + "'");
  if (t->dtype != DType::F32 || t->dims.size() != 1 || t->dims[0] != n)
    throw FormatError("tensor '" + name + "': expected f32 [" + std::to_string(n) + "], got " + dtype_name(t->dtype) + " " + shape_str(t->dims));
  return reinterpret_cast<const float*>(data(*t));
}

WeightView UPGFile::weight(const std::string& name, uint64_t rows, uint64_t cols) const {
  const TensorInfo* t = find(name);
  if (!t) throw FormatError("missing tensor '" + name + "'");
  if (t->dims.size() != 2 || t->dims[0] != rows || t->dims[1] != cols)
    throw FormatError("tensor '" + name + "': expected shape [" + std::to_string(rows) + ", " + std::to_string(cols) + "], got " + shape_str(t->dims));
  if (t->dtype == DType::I32) throw FormatError("tensor '" + name + "': i32 is not a weight type");
  WeightView w;
  w.type = t->dtype;
  w.block = t->block;
  w.rows = int64_t(rows);
  w.cols = int64_t(cols);
  w.codes = data(*t);
  set_sections(w);

  const TensorInfo* rp = find(name + ".outlier_rowptr");
  const TensorInfo* col = find(name + ".outlier_col");
  const TensorInfo* val = find(name + ".outlier_val");
  if (!rp && !col && !val) return w;
  const std::string where = "tensor '" + name + "' outliers: ";
  if (!rp || !col || !val) throw FormatError(where + "rowptr, col and val must all be present");
  if (!is_quantized(t->dtype)) throw FormatError(where + "only quantized matrices carry outliers");
  if (has_grid(t->dtype)) throw FormatError(where + dtype_name(t->dtype) + " carries no outliers (its grid has no 0)");
  if (rp->dtype != DType::I32 || rp->dims[0] != rows + 1) throw FormatError(where + "rowptr must be i32 [rows + 1]");
  if (col->dtype != DType::I32 || val->dtype != DType::F16 || val->dims.size() != 1 || col->dims[0] != val->dims[0])
    throw FormatError(where + "col must be i32 [nnz] and val f16 [nnz]");
  const auto* rowptr = reinterpret_cast<const int32_t*>(data(*rp));
  const auto* cidx = reinterpret_cast<const int32_t*>(data(*col));
  const uint64_t nnz = col->dims[0];
  if (rowptr[0] != 0 || uint64_t(rowptr[rows]) != nnz) throw FormatError(where + "rowptr must start at 0 and end at nnz");
  for (uint64_t r = 0; r < rows; ++r) {
    if (rowptr[r + 1] < rowptr[r]) throw FormatError(where + "rowptr decreases at row " + std::to_string(r));
    for (int32_t i = rowptr[r]; i < rowptr[r + 1]; ++i)
      if (cidx[i] < 0 || uint64_t(cidx[i]) >= cols || (i > rowptr[r] && cidx[i] <= cidx[i - 1]))
        throw FormatError(where + "column indices of row " + std::to_string(r) + " out of range or not increasing");
  }
  w.o_rowptr = rowptr;
  w.o_col = cidx;
  w.o_val = reinterpret_cast<const uint16_t*>(data(*val));
  return w;
}

}  // namespace upg
