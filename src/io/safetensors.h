#pragma once
// Reader and writer for the safetensors format: 8-byte little-endian header length, a JSON header
// {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then the byte buffer.
// The reader memory-maps the file and validates every entry before anything is read from it.
// It does not depend on LibTorch: entries are raw, typed views into the mapping.
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace kvdrift {

enum class StorageDtype { F32, F16, BF16 };

const char* storage_dtype_name(StorageDtype dtype);  // "F32", "F16", "BF16"
size_t storage_dtype_size(StorageDtype dtype);

struct SafetensorsEntry {
  std::string name;
  StorageDtype dtype;
  std::vector<int64_t> shape;
  const std::byte* data;  // points into the mapping; valid while the SafetensorsFile lives
  size_t nbytes;
};

class SafetensorsFile {
 public:
  // Throws Error naming the file and the problem: missing/unreadable file, header length past the
  // end of the file, header that is not a JSON object, unsupported dtype, shape/size mismatch,
  // offsets out of range, overlapping tensors.
  explicit SafetensorsFile(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;
  SafetensorsFile(SafetensorsFile&& other) noexcept;
  SafetensorsFile& operator=(SafetensorsFile&& other) noexcept;

  const std::string& path() const { return path_; }
  const std::vector<SafetensorsEntry>& entries() const { return entries_; }  // sorted by name
  const SafetensorsEntry* find(const std::string& name) const;               // nullptr if absent
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  void unmap();

  std::string path_;
  void* mapping_ = nullptr;
  size_t mapping_size_ = 0;
  std::vector<SafetensorsEntry> entries_;
  std::map<std::string, std::string> metadata_;
};

struct SafetensorsTensorView {
  std::string name;
  StorageDtype dtype;
  std::vector<int64_t> shape;
  const void* data;
  size_t nbytes;  // must equal product(shape) * storage_dtype_size(dtype)
};

// Writes tensors (laid out in the given order, 8-byte aligned header) atomically: a temporary file
// renamed into place, so a failure never leaves a half-written file under `path`.
void write_safetensors(const std::string& path, const std::vector<SafetensorsTensorView>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

}  // namespace kvdrift
