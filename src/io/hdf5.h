#pragma once
// A small RAII layer over the HDF5 C API for kvdrift's outputs: `kvdrift quantize` files and the
// per-step run logs (SPEC §4), which grow along an unlimited step axis, are flushed as the run goes
// and can be read live by SWMR readers (h5py: File(path, 'r', libver='latest', swmr=True)).
//
// It works on raw typed buffers and shape vectors (no LibTorch). Every failure throws kvdrift::Error
// naming the file and the group, dataset or attribute, with HDF5's own message appended; HDF5's
// automatic error-stack printing is turned off (for the threads that open files: the setting is
// per thread in thread-safe builds of HDF5).
//
// Paths are relative to the group they are given to, or absolute when they start with '/'.
#include <H5Ipublic.h>
#include <H5Tpublic.h>

#include <cstdint>
#include <functional>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace kvdrift::h5 {

// Element types of numeric datasets and attributes; stored little-endian whatever the host.
enum class ElementType { Float32, Float64, Int64, Int32, UInt8 };

const char* element_type_name(ElementType type);  // "float32", "float64", "int64", "int32", "uint8"

template <typename T>
constexpr ElementType element_type_of() {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double> || std::is_same_v<T, int64_t> ||
                    std::is_same_v<T, int32_t> || std::is_same_v<T, uint8_t>,
                "kvdrift::h5 stores float, double, int64_t, int32_t and uint8_t elements");
  if constexpr (std::is_same_v<T, float>)
    return ElementType::Float32;
  else if constexpr (std::is_same_v<T, double>)
    return ElementType::Float64;
  else if constexpr (std::is_same_v<T, int64_t>)
    return ElementType::Int64;
  else if constexpr (std::is_same_v<T, int32_t>)
    return ElementType::Int32;
  else
    return ElementType::UInt8;
}

// Owns one HDF5 identifier and closes it with the matching H5*close function.
class Handle {
 public:
  using Closer = herr_t (*)(hid_t);  // H5Fclose, H5Gclose, H5Dclose, H5Sclose, ...

  Handle() = default;
  Handle(hid_t id, Closer close) : id_(id), close_(close) {}
  ~Handle() { reset(); }
  Handle(const Handle&) = delete;
  Handle& operator=(const Handle&) = delete;
  Handle(Handle&& other) noexcept : id_(other.id_), close_(other.close_) { other.id_ = H5I_INVALID_HID; }
  Handle& operator=(Handle&& other) noexcept;

  hid_t get() const { return id_; }
  hid_t release();  // gives up ownership without closing
  void reset();     // closes now; errors on close are dropped (destructors must not throw)

 private:
  hid_t id_ = H5I_INVALID_HID;
  Closer close_ = nullptr;
};

// A file (its root group), group or dataset: something that carries attributes.
class Object {
 public:
  hid_t id() const { return handle_.get(); }  // for direct HDF5 calls the layer does not cover
  const std::string& file_path() const { return file_path_; }
  const std::string& path() const { return path_; }  // absolute path inside the file

  // Writing replaces an attribute of the same name, whatever its old type or size. Integers are
  // stored as int64, floating-point values as float64, strings as variable-length UTF-8.
  void set_attribute(const std::string& name, const std::string& value);
  void set_attribute(const std::string& name, const char* value) { set_attribute(name, std::string(value)); }
  void set_attribute(const std::string& name, double value);
  // Full uint64 values (seeds), beyond the int64 the integer overloads store: stored as uint64.
  void set_uint64_attribute(const std::string& name, uint64_t value);
  template <typename Integer, std::enable_if_t<std::is_integral_v<Integer> && !std::is_same_v<Integer, bool>, int> = 0>
  void set_attribute(const std::string& name, Integer value) {
    set_int64_attribute(name, checked_int64(name, value));
  }
  void set_attribute(const std::string& name, const std::vector<double>& values);
  void set_attribute(const std::string& name, const std::vector<int64_t>& values);

  // T is one of std::string, int64_t, double, std::vector<int64_t>, std::vector<double>. Any stored
  // integer (float) type reads as int64_t (double); a scalar must hold exactly one value, a vector
  // reads every value. Fails naming the attribute when it is missing or of another kind.
  template <typename T>
  T attribute(const std::string& name) const;
  bool has_attribute(const std::string& name) const;
  // An integer or floating-point attribute as float64; none for text, arrays or a missing name.
  std::optional<double> numeric_attribute(const std::string& name) const;
  std::vector<std::string> attribute_names() const;  // sorted by name

 protected:
  Object(Handle handle, std::string file_path, std::string path)
      : handle_(std::move(handle)), file_path_(std::move(file_path)), path_(std::move(path)) {}

  std::string describe() const;  // "group '/a/b'" or "dataset '/a/b/x'", for messages
  std::string absolute(const std::string& relative_path) const;

  Handle handle_;
  std::string file_path_;
  std::string path_;

 private:
  template <typename Integer>
  int64_t checked_int64(const std::string& name, Integer value) const {
    if constexpr (std::is_unsigned_v<Integer> && sizeof(Integer) >= sizeof(int64_t)) {
      if (value > static_cast<Integer>(std::numeric_limits<int64_t>::max())) fail_int64_range(name);
    }
    return static_cast<int64_t>(value);
  }
  [[noreturn]] void fail_int64_range(const std::string& name) const;
  void set_int64_attribute(const std::string& name, int64_t value);
  void replace_attribute(const std::string& name, hid_t file_type, hid_t space, hid_t memory_type, const void* data);
  struct OpenedAttribute;
  // Opens attribute `name` for reading; fails unless it holds values of `expected_class` (one
  // value when `scalar`). `expected_name` names the wanted type in the message.
  OpenedAttribute open_attribute(const std::string& name, H5T_class_t expected_class, const char* expected_name,
                                 bool scalar) const;
  template <typename T>
  std::vector<T> read_numeric_attribute(const std::string& name, bool scalar) const;
};

template <>
std::string Object::attribute<std::string>(const std::string& name) const;
template <>
int64_t Object::attribute<int64_t>(const std::string& name) const;
template <>
double Object::attribute<double>(const std::string& name) const;
template <>
std::vector<int64_t> Object::attribute<std::vector<int64_t>>(const std::string& name) const;
template <>
std::vector<double> Object::attribute<std::vector<double>>(const std::string& name) const;

class Dataset : public Object {
 public:
  std::vector<hsize_t> shape() const;  // {} for a scalar
  int rank() const { return static_cast<int>(shape().size()); }
  std::string type_name() const;  // "float32", ..., "int16", "string", "compound"

  // All elements in row-major order. Fails ("FILE: dataset '/x' holds int64, expected float32")
  // unless the stored type has T's class, size and signedness.
  template <typename T>
  std::vector<T> read(std::vector<hsize_t>* shape_out = nullptr) const {
    std::vector<hsize_t> shape = checked_shape(element_type_of<T>());
    std::vector<T> values(element_count(shape));
    if (!values.empty()) read_into(element_type_of<T>(), values.data());
    if (shape_out) *shape_out = std::move(shape);
    return values;
  }
  // String datasets, variable- or fixed-length: every element in row-major order, or the one value.
  std::vector<std::string> read_strings() const;
  std::string read_string() const;

  static hsize_t element_count(const std::vector<hsize_t>& shape);

 protected:
  friend class Group;
  Dataset(Handle handle, std::string file_path, std::string path)
      : Object(std::move(handle), std::move(file_path), std::move(path)) {}

 private:
  std::vector<hsize_t> checked_shape(ElementType expected) const;
  void read_into(ElementType type, void* out) const;
};

struct AppendableOptions {
  hsize_t chunk_rows = 64;  // rows per chunk along the unlimited axis
  int gzip_level = 4;       // 0 stores chunks uncompressed
  bool shuffle = true;      // byte-shuffle before gzip (with gzip only): floats compress much better
};

// A dataset of shape [rows, row_shape...] that grows along axis 0: the per-step arrays of a run log.
class AppendableDataset : public Dataset {
 public:
  ElementType element_type() const { return element_type_; }
  const std::vector<hsize_t>& row_shape() const { return row_shape_; }
  hsize_t rows() const;

  // Extends axis 0 by `count` rows and writes them (count * product(row_shape) values, row-major).
  // T must be the stored element type. If the write fails the dataset keeps its old length.
  template <typename T>
  void append(const T* rows, hsize_t count) {
    append_raw(element_type_of<T>(), rows, count);
  }
  template <typename T>
  void append(const std::vector<T>& rows) {
    append_raw(element_type_of<T>(), rows.data(), whole_rows(rows.size()));
  }
  // Shrinks axis 0 to `rows` (at most the current length), e.g. to redo a half-written sample.
  void truncate(hsize_t rows);
  // Writes this dataset's cached chunks and metadata to the file, so SWMR readers see every row.
  void flush();

 private:
  friend class Group;
  AppendableDataset(Handle handle, std::string file_path, std::string path, ElementType element_type,
                    std::vector<hsize_t> row_shape);
  void append_raw(ElementType type, const void* rows, hsize_t count);
  hsize_t whole_rows(size_t value_count) const;

  ElementType element_type_;
  std::vector<hsize_t> row_shape_;
  hsize_t row_values_;  // values per row
};

class Group : public Object {
 public:
  // Creates the group and any missing parents; fails if `path` already exists.
  Group create_group(const std::string& path);
  Group open_group(const std::string& path) const;
  // Opens the group, creating it and any missing parents if it does not exist.
  Group require_group(const std::string& path);
  // True when `path` names an object (a missing parent, or a parent that is not a group, gives false).
  bool exists(const std::string& path) const;
  std::vector<std::string> children() const;  // link names, sorted by name (so "10" comes before "2")
  std::vector<std::string> child_groups() const;  // the children that are groups, sorted the same way
  // Unlinks `name`. HDF5 does not reclaim the space (h5repack does).
  void remove(const std::string& name);

  // Fixed-size numeric datasets: `shape` {} is a scalar. gzip_level 1-9 stores the array chunked,
  // shuffled and compressed (a scalar or empty array is stored plain). Writing replaces an existing
  // dataset at `path` (the old one's space in the file is not reclaimed); missing parents are created.
  template <typename T>
  Dataset write(const std::string& path, const T* data, const std::vector<hsize_t>& shape, int gzip_level = 0) {
    return write_raw(path, element_type_of<T>(), data, shape, gzip_level);
  }
  template <typename T>
  Dataset write(const std::string& path, const std::vector<T>& values, const std::vector<hsize_t>& shape,
                int gzip_level = 0) {
    check_value_count(path, values.size(), shape);
    return write_raw(path, element_type_of<T>(), values.data(), shape, gzip_level);
  }
  // Variable-length UTF-8 strings: a 1-D dataset of `values`, or a scalar holding `value`.
  Dataset write_strings(const std::string& path, const std::vector<std::string>& values);
  Dataset write_string(const std::string& path, const std::string& value);

  // Fails naming the file and dataset when `path` is missing or is not a dataset.
  Dataset open_dataset(const std::string& path) const;
  template <typename T>
  std::vector<T> read(const std::string& path, std::vector<hsize_t>* shape_out = nullptr) const {
    return open_dataset(path).read<T>(shape_out);
  }
  std::vector<std::string> read_strings(const std::string& path) const { return open_dataset(path).read_strings(); }
  std::string read_string(const std::string& path) const { return open_dataset(path).read_string(); }
  std::vector<hsize_t> shape(const std::string& path) const { return open_dataset(path).shape(); }
  int rank(const std::string& path) const { return open_dataset(path).rank(); }

  // A chunked dataset of shape [0, row_shape...], unlimited along axis 0. Replaces an existing
  // dataset at `path`; missing parents are created. Create every one before File::start_swmr_write.
  template <typename T>
  AppendableDataset create_appendable(const std::string& path, const std::vector<hsize_t>& row_shape,
                                      const AppendableOptions& options = {}) {
    return create_appendable_raw(path, element_type_of<T>(), row_shape, options);
  }
  // Reopens one for appending (resume): it must be unlimited along axis 0 and hold a supported type.
  AppendableDataset open_appendable(const std::string& path) const;

 protected:
  Group(Handle handle, std::string file_path, std::string path)
      : Object(std::move(handle), std::move(file_path), std::move(path)) {}

 private:
  // Fails naming the file unless `path` exists and is an object of `kind` (H5I_GROUP, H5I_DATASET).
  void require_kind(const std::string& path, H5I_type_t kind) const;
  Handle create_dataset(const std::string& path, hid_t file_type, hid_t space, hid_t create_plist, hid_t access_plist);
  Dataset write_raw(const std::string& path, ElementType type, const void* data, const std::vector<hsize_t>& shape,
                    int gzip_level);
  AppendableDataset create_appendable_raw(const std::string& path, ElementType type,
                                          const std::vector<hsize_t>& row_shape, const AppendableOptions& options);
  Dataset write_string_array(const std::string& path, const std::vector<std::string>& values,
                             const std::vector<hsize_t>& shape);
  void check_value_count(const std::string& path, size_t value_count, const std::vector<hsize_t>& shape) const;
};

// An open HDF5 file, usable as its root group. Groups and datasets opened from it stay valid after
// the File is destroyed; the file itself closes when the last of them does.
class File : public Group {
 public:
  // Uses the latest file format (needed for SWMR). truncate = false fails if `path` exists.
  static File create(const std::string& path, bool truncate);
  // swmr_read: read a file that a SWMR writer has open, or one left by a writer killed in SWMR
  // mode (such a file refuses ordinary opens until recovered).
  static File open_read(const std::string& path, bool swmr_read = false);
  static File open_read_write(const std::string& path);
  // Opens for writing a file left by a writer killed in SWMR mode: clears the "open for write"
  // flags (as h5clear does) and moves the end-of-allocation to the end of the file, where the last
  // chunks were written. Only for files no live process is writing.
  static File recover_read_write(const std::string& path);

  void flush();
  // Switches to single-writer/multiple-reader mode. Create every group, dataset and attribute first:
  // afterwards only writes, appends, truncations and flushes are allowed.
  void start_swmr_write();
  // Flushes and closes now, reporting errors the destructor would have to drop. Groups and datasets
  // still open keep the file open until the last of them closes.
  void close();

 private:
  File(Handle handle, std::string path) : Group(std::move(handle), std::move(path), "/") {}
  static File open(const std::string& path, unsigned flags, hid_t access_plist, const char* purpose);
};

// Writes a new HDF5 file: `write` fills PATH.partial, which is renamed to `path` once closed, so a
// failure (a full disk, an error in `write`) leaves no file that looks complete, and no partial one.
// The writer holds PATH.lock (core/writer_lock.h) throughout: a second one is refused naming it.
// Whether `path` may be replaced is the caller's check (core/output_path.h); without `replace`, a
// file that appears at `path` while this writes is left alone and this fails.
void write_new_file(const std::string& path, bool replace, const std::function<void(File&)>& write);

// Whether `path` starts like an HDF5 file: the format signature at byte 0, or after a user block at
// byte 512, 1024, 2048, ... (the superblock's rule). Says nothing of whether the rest is readable.
bool is_hdf5_file(const std::string& path);

// Allocates `bytes` of disk space past the end of the closed HDF5 file at `path`, so that the next
// session that opens it for writing cannot run out of space midway: a write that fails leaves HDF5's
// metadata half-updated and the whole file unreadable. HDF5 truncates a file to its end of
// allocation when it closes it, which gives the unused space back. When the space is not there this
// fails and leaves the file as it was.
void reserve_space(const std::string& path, uint64_t bytes);

}  // namespace kvdrift::h5
