// The UPG reader: maps a file read-only and checks every field against the file before any use
// (docs/FORMAT.md, "Validation"). Bad files raise FormatError; nothing reads out of bounds.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include "upg/kernels.h"
#include "upg/quant.h"

namespace upg {

constexpr uint8_t kMagic[8] = {0x55, 0x50, 0x47, 0x00, 0x0D, 0x0A, 0x1A, 0x0A};  // "UPG\0\r\n\x1a\n"
constexpr uint32_t kVersion = 2;  // the newest version this reader knows (FORMAT.md "Versions")
constexpr uint64_t kPreambleSize = 64;

class FormatError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct TensorInfo {
  std::string name;
  DType dtype;
  int block;                  // quantized types only
  std::vector<uint64_t> dims; // outermost first
  uint64_t offset;            // relative to the data section
  uint64_t nbytes;
  uint32_t crc32;
};

// A read-only memory mapping of a whole file.
class MappedFile {
 public:
  explicit MappedFile(const std::string& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  const uint8_t* data() const { return data_; }
  uint64_t size() const { return size_; }

 private:
  const uint8_t* data_ = nullptr;
  uint64_t size_ = 0;
};

class UPGFile {
 public:
  explicit UPGFile(const std::string& path);  // validates preamble and directory

  const std::string& header() const { return header_; }
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const TensorInfo* find(const std::string& name) const;
  const uint8_t* data(const TensorInfo& t) const { return map_.data() + data_offset_ + t.offset; }
  uint64_t file_size() const { return map_.size(); }
  uint64_t data_offset() const { return data_offset_; }
  const uint8_t* data_section() const { return map_.data() + data_offset_; }

  // Names the data section's content: the same for two files of the same tensors and bytes
  // (a hash of the directory, whose entries hold each tensor's crc32, and the data size), so a
  // backend that copies the weights can hold one copy for every session of the same content.
  uint64_t content_id() const { return content_id_; }

  // Checks every tensor's crc32 and that every byte outside the tensors (the padding after the
  // directory, and every gap before, between and after the tensors) is zero; the error names the
  // first tensor or gap that fails.
  void verify() const;

  // A weight matrix by name, checked to have `rows` x `cols`, with its outlier companion (checked
  // entry by entry) when present. Dense types give block 0.
  WeightView weight(const std::string& name, uint64_t rows, uint64_t cols) const;

  // A 1-D f32 vector by name, checked to have n elements.
  const float* vector_f32(const std::string& name, uint64_t n) const;

 private:
  void parse();
  MappedFile map_;
  std::string path_;
  std::string header_;
  uint64_t directory_end_ = 0, data_offset_ = 0, data_size_ = 0, content_id_ = 0;
  std::vector<TensorInfo> tensors_;
  std::vector<size_t> by_offset_;  // indices into tensors_, in file order
  std::unordered_map<std::string, size_t> index_;
};

uint32_t crc32(const uint8_t* p, uint64_t n, uint32_t crc = 0);

}  // namespace upg
