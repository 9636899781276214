#include "io/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <utility>

#include "core/error.h"

namespace kvdrift {

namespace {

using nlohmann::json;

constexpr size_t kLengthPrefixBytes = 8;
// Same cap as the reference implementation: a larger header is corrupt or hostile, not a model.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;
constexpr const char* kMetadataKey = "__metadata__";

std::optional<StorageDtype> parse_storage_dtype(const std::string& name) {
  for (StorageDtype dtype : {StorageDtype::F32, StorageDtype::F16, StorageDtype::BF16}) {
    if (name == storage_dtype_name(dtype)) return dtype;
  }
  return std::nullopt;
}

// Shapes come from untrusted files, so the byte count must not silently wrap around.
std::optional<uint64_t> checked_byte_count(const std::vector<int64_t>& shape, size_t element_size) {
  uint64_t count = element_size;
  for (int64_t dim : shape) {
    const auto extent = static_cast<uint64_t>(dim);
    if (extent != 0 && count > std::numeric_limits<uint64_t>::max() / extent) return std::nullopt;
    count *= extent;
  }
  return count;
}

std::string shape_string(const std::vector<int64_t>& shape) { return fmt::format("[{}]", fmt::join(shape, ", ")); }

uint64_t read_u64_le(const std::byte* bytes) {
  uint64_t value = 0;
  for (size_t i = 0; i < 8; ++i) value |= static_cast<uint64_t>(bytes[i]) << (8 * i);
  return value;
}

std::string u64_le_bytes(uint64_t value) {
  std::string bytes(8, '\0');
  for (size_t i = 0; i < 8; ++i) bytes[i] = static_cast<char>((value >> (8 * i)) & 0xff);
  return bytes;
}

// Closes a descriptor on every exit path, including exceptions thrown while it is open.
class FdCloser {
 public:
  explicit FdCloser(int fd) : fd_(fd) {}
  ~FdCloser() {
    if (fd_ >= 0) ::close(fd_);
  }
  FdCloser(const FdCloser&) = delete;
  FdCloser& operator=(const FdCloser&) = delete;
  // Closes now so that a failing close (e.g. a deferred write error) can be reported.
  int close_now() {
    const int result = ::close(fd_);
    fd_ = -1;
    return result;
  }

 private:
  int fd_;
};

// Validates one header entry; its data points into `buffer`, the bytes after the header.
SafetensorsEntry parse_entry(const std::string& path, const std::string& name,
                                                   const json& info, const std::byte* buffer,
                                                   uint64_t buffer_size) {
  if (!info.is_object()) fail("{}: tensor '{}' header entry is not a JSON object", path, name);

  const auto dtype_field = info.find("dtype");
  if (dtype_field == info.end() || !dtype_field->is_string()) {
    fail("{}: tensor '{}' has no string \"dtype\"", path, name);
  }

  const auto shape_field = info.find("shape");
  if (shape_field == info.end() || !shape_field->is_array()) {
    fail("{}: tensor '{}' has no \"shape\" array", path, name);
  }
  std::vector<int64_t> shape;
  for (const json& dim : *shape_field) {
    // nlohmann stores non-negative integers as unsigned; negatives and floats fail this test.
    if (!dim.is_number_unsigned() || dim.get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      fail("{}: tensor '{}' shape {} must contain only non-negative integers", path, name, shape_field->dump());
    }
    shape.push_back(dim.get<int64_t>());
  }

  const auto offsets_field = info.find("data_offsets");
  if (offsets_field == info.end() || !offsets_field->is_array() || offsets_field->size() != 2 ||
      !(*offsets_field)[0].is_number_unsigned() || !(*offsets_field)[1].is_number_unsigned() ||
      (*offsets_field)[0].get<uint64_t>() > (*offsets_field)[1].get<uint64_t>()) {
    fail("{}: tensor '{}' data_offsets must be [begin, end] with non-negative integers begin <= end, got {}", path,
         name, offsets_field == info.end() ? "nothing" : offsets_field->dump());
  }
  const uint64_t begin = (*offsets_field)[0].get<uint64_t>();
  const uint64_t end = (*offsets_field)[1].get<uint64_t>();

  const std::string dtype_name = dtype_field->get<std::string>();
  const std::optional<StorageDtype> dtype = parse_storage_dtype(dtype_name);
  if (!dtype) fail("{}: tensor '{}' has unsupported dtype {} (supported: F32, F16, BF16)", path, name, dtype_name);

  const size_t element_size = storage_dtype_size(*dtype);
  const std::optional<uint64_t> expected_bytes = checked_byte_count(shape, element_size);
  if (!expected_bytes || *expected_bytes != end - begin) {
    fail("{}: tensor '{}' size mismatch: shape {} of {} needs {} bytes but data_offsets [{}, {}] hold {}", path, name,
         shape_string(shape), dtype_name, expected_bytes ? fmt::to_string(*expected_bytes) : "more than 2^64",
         begin, end, end - begin);
  }
  if (end > buffer_size) {
    fail("{}: tensor '{}' data_offsets [{}, {}] run past the end of the {}-byte data buffer", path, name, begin, end,
         buffer_size);
  }

  return SafetensorsEntry{name, *dtype, std::move(shape), buffer + begin, static_cast<size_t>(end - begin)};
}

void check_no_overlap(const std::string& path, const std::vector<SafetensorsEntry>& entries, const std::byte* buffer) {
  // Zero-size tensors own no bytes, so they may sit anywhere, even inside another tensor.
  std::vector<const SafetensorsEntry*> by_offset;
  for (const SafetensorsEntry& entry : entries) {
    if (entry.nbytes > 0) by_offset.push_back(&entry);
  }
  std::sort(by_offset.begin(), by_offset.end(),
            [](const SafetensorsEntry* a, const SafetensorsEntry* b) { return a->data < b->data; });
  // With begins sorted, any overlapping pair implies an overlapping adjacent pair.
  for (size_t i = 1; i < by_offset.size(); ++i) {
    const SafetensorsEntry& previous = *by_offset[i - 1];
    const SafetensorsEntry& current = *by_offset[i];
    if (current.data < previous.data + previous.nbytes) {
      const auto previous_begin = previous.data - buffer;
      const auto current_begin = current.data - buffer;
      fail("{}: tensor '{}' data_offsets [{}, {}] overlap tensor '{}' [{}, {}]", path, previous.name, previous_begin,
           previous_begin + previous.nbytes, current.name, current_begin, current_begin + current.nbytes);
    }
  }
}

std::map<std::string, std::string> parse_metadata(const std::string& path, const json& metadata) {
  if (!metadata.is_object()) fail("{}: {} must be a JSON object of strings", path, kMetadataKey);
  std::map<std::string, std::string> result;
  for (const auto& [key, value] : metadata.items()) {
    if (!value.is_string()) {
      fail("{}: {} value for key '{}' is not a string: {}", path, kMetadataKey, key, value.dump());
    }
    result.emplace(key, value.get<std::string>());
  }
  return result;
}

}  // namespace

const char* storage_dtype_name(StorageDtype dtype) {
  switch (dtype) {
    case StorageDtype::F32:
      return "F32";
    case StorageDtype::F16:
      return "F16";
    case StorageDtype::BF16:
      return "BF16";
  }
  return "?";
}

size_t storage_dtype_size(StorageDtype dtype) {
  switch (dtype) {
    case StorageDtype::F32:
      return 4;
    case StorageDtype::F16:
    case StorageDtype::BF16:
      return 2;
  }
  return 0;
}

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail("cannot open safetensors file {}: {}", path, std::strerror(errno));
  FdCloser closer(fd);

  struct stat info {};
  if (::fstat(fd, &info) != 0) fail("cannot open safetensors file {}: {}", path, std::strerror(errno));
  if (!S_ISREG(info.st_mode)) fail("cannot open safetensors file {}: not a regular file", path);
  const auto file_size = static_cast<uint64_t>(info.st_size);
  if (file_size < kLengthPrefixBytes) {
    fail("{}: file is {} bytes, shorter than the 8-byte header length of a safetensors file", path, file_size);
  }

  void* mapping = ::mmap(nullptr, file_size, PROT_READ, MAP_PRIVATE, fd, 0);
  if (mapping == MAP_FAILED) fail("cannot map safetensors file {}: {}", path, std::strerror(errno));
  mapping_ = mapping;
  mapping_size_ = file_size;

  // The destructor does not run when a constructor throws, so release the mapping here.
  try {
    const auto* bytes = static_cast<const std::byte*>(mapping_);
    const uint64_t header_size = read_u64_le(bytes);
    if (header_size > file_size - kLengthPrefixBytes) {
      fail("{}: header length {} runs past the end of the file ({} bytes)", path, header_size, file_size);
    }
    if (header_size > kMaxHeaderBytes) {
      fail("{}: header length {} exceeds the {}-byte limit", path, header_size, kMaxHeaderBytes);
    }

    const auto* header_begin = reinterpret_cast<const char*>(bytes + kLengthPrefixBytes);
    json header;
    try {
      header = json::parse(header_begin, header_begin + header_size);
    } catch (const json::parse_error& error) {
      fail("{}: header is not valid JSON (syntax error at byte {} of the header)", path, error.byte);
    } catch (const json::exception& error) {  // out_of_range: a number too large
      fail("{}: header is not valid JSON ({})", path, error.what());
    }
    if (!header.is_object()) fail("{}: header is not a JSON object", path);

    const std::byte* buffer = bytes + kLengthPrefixBytes + header_size;
    const uint64_t buffer_size = file_size - kLengthPrefixBytes - header_size;
    for (const auto& [name, info_json] : header.items()) {
      if (name == kMetadataKey) {
        metadata_ = parse_metadata(path, info_json);
      } else {
        entries_.push_back(parse_entry(path, name, info_json, buffer, buffer_size));
      }
    }
    check_no_overlap(path, entries_, buffer);

    // nlohmann::json objects iterate in key order already; sort anyway so find() never depends on it.
    std::sort(entries_.begin(), entries_.end(),
              [](const SafetensorsEntry& a, const SafetensorsEntry& b) { return a.name < b.name; });
  } catch (...) {
    unmap();
    throw;
  }
}

SafetensorsFile::~SafetensorsFile() { unmap(); }

SafetensorsFile::SafetensorsFile(SafetensorsFile&& other) noexcept
    : path_(std::move(other.path_)),
      mapping_(std::exchange(other.mapping_, nullptr)),
      mapping_size_(std::exchange(other.mapping_size_, 0)),
      entries_(std::move(other.entries_)),
      metadata_(std::move(other.metadata_)) {
  other.entries_.clear();
  other.metadata_.clear();
}

SafetensorsFile& SafetensorsFile::operator=(SafetensorsFile&& other) noexcept {
  if (this != &other) {
    unmap();
    path_ = std::move(other.path_);
    mapping_ = std::exchange(other.mapping_, nullptr);
    mapping_size_ = std::exchange(other.mapping_size_, 0);
    entries_ = std::move(other.entries_);
    metadata_ = std::move(other.metadata_);
    other.entries_.clear();
    other.metadata_.clear();
  }
  return *this;
}

void SafetensorsFile::unmap() {
  if (mapping_ != nullptr) ::munmap(mapping_, mapping_size_);
  mapping_ = nullptr;
  mapping_size_ = 0;
}

const SafetensorsEntry* SafetensorsFile::find(const std::string& name) const {
  const auto it = std::lower_bound(entries_.begin(), entries_.end(), name,
                                   [](const SafetensorsEntry& entry, const std::string& key) { return entry.name < key; });
  return it != entries_.end() && it->name == name ? &*it : nullptr;
}

void write_safetensors(const std::string& path, const std::vector<SafetensorsTensorView>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  // Validate everything before touching the filesystem, so a bad call leaves nothing behind.
  // ordered_json keeps the tensors in the caller's order, matching their byte layout.
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header[kMetadataKey] = metadata;
  std::set<std::string> names;
  uint64_t offset = 0;
  for (const SafetensorsTensorView& tensor : tensors) {
    if (tensor.name == kMetadataKey) fail("cannot write {}: tensor name '{}' is reserved", path, tensor.name);
    if (!names.insert(tensor.name).second) fail("cannot write {}: duplicate tensor name '{}'", path, tensor.name);
    const bool negative_dim = std::any_of(tensor.shape.begin(), tensor.shape.end(), [](int64_t d) { return d < 0; });
    const std::optional<uint64_t> expected_bytes =
        negative_dim ? std::nullopt : checked_byte_count(tensor.shape, storage_dtype_size(tensor.dtype));
    if (!expected_bytes || *expected_bytes != tensor.nbytes) {
      fail("cannot write {}: tensor '{}' has {} bytes but shape {} of {} needs {}", path, tensor.name, tensor.nbytes,
           shape_string(tensor.shape), storage_dtype_name(tensor.dtype),
           expected_bytes ? fmt::to_string(*expected_bytes) : "an invalid size");
    }
    header[tensor.name] = {{"dtype", storage_dtype_name(tensor.dtype)},
                           {"shape", tensor.shape},
                           {"data_offsets", {offset, offset + tensor.nbytes}}};
    offset += tensor.nbytes;
  }
  std::string header_text = header.dump();
  // Padding the header keeps the byte buffer 8-byte aligned within the file (and the mapping).
  header_text.append((8 - header_text.size() % 8) % 8, ' ');

  const std::string temp_path = fmt::format("{}.tmp.{}", path, ::getpid());
  const int fd = ::open(temp_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) fail("cannot write safetensors file {}: {}", path, std::strerror(errno));
  FdCloser closer(fd);

  const auto fail_and_remove = [&](const char* what) {
    const std::string reason = std::strerror(errno);
    ::unlink(temp_path.c_str());
    fail("cannot write safetensors file {}: {} failed: {}", path, what, reason);
  };
  const auto write_all = [&](const void* data, size_t size) {
    const auto* cursor = static_cast<const char*>(data);
    while (size > 0) {
      const ssize_t written = ::write(fd, cursor, size);
      if (written < 0 && errno == EINTR) continue;
      if (written < 0) fail_and_remove("write");
      cursor += written;
      size -= static_cast<size_t>(written);
    }
  };

  const std::string length_prefix = u64_le_bytes(header_text.size());
  write_all(length_prefix.data(), length_prefix.size());
  write_all(header_text.data(), header_text.size());
  for (const SafetensorsTensorView& tensor : tensors) write_all(tensor.data, tensor.nbytes);
  if (closer.close_now() != 0) fail_and_remove("close");
  if (::rename(temp_path.c_str(), path.c_str()) != 0) fail_and_remove("rename");
}

}  // namespace kvdrift
