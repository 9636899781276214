#include "io/hdf5.h"

#include <fmt/format.h>
#include <hdf5.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>

#include "core/error.h"
#include "core/writer_lock.h"

namespace kvdrift::h5 {

namespace {

// HDF5's own account of a failure: the most specific entry of its error stack (where the failure
// began), as a suffix for our message. Clears the stack.
std::string hdf5_cause() {
  std::string cause;
  H5Ewalk2(
      H5E_DEFAULT, H5E_WALK_UPWARD,
      [](unsigned depth, const H5E_error2_t* entry, void* out) -> herr_t {
        if (depth == 0 && entry->desc) *static_cast<std::string*>(out) = entry->desc;
        return 0;
      },
      &cause);
  H5Eclear2(H5E_DEFAULT);
  return cause.empty() ? "" : " (HDF5: " + cause + ")";
}

// Passes an HDF5 result through, or throws Error with the formatted message when it is negative.
template <typename Result, typename... Args>
Result check(Result result, fmt::format_string<Args...> format, Args&&... args) {
  if (result < 0) throw Error(fmt::format(format, std::forward<Args>(args)...) + hdf5_cause());
  return result;
}

// HDF5 closes what is still open when the program exits; a file whose close failed (a full disk)
// stays registered, and closing it again there crashes. Handles close every file, so nothing is left
// for exit to do. Set at load time: it only works before the first call that starts the library.
[[maybe_unused]] const bool kNoCloseAtExit = H5dont_atexit() >= 0;

// HDF5 prints its error stack to stderr by default; here errors surface as kvdrift::Error instead.
// Thread-safe builds keep this setting per thread.
void silence_error_printing() {
  thread_local const bool silenced = H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr) >= 0;
  (void)silenced;
}

struct ElementInfo {
  const char* name;
  hid_t memory_type;
  hid_t file_type;
  H5T_class_t type_class;
  size_t size;
  bool is_signed;
};

constexpr ElementType kElementTypes[] = {ElementType::Float32, ElementType::Float64, ElementType::Int64,
                                         ElementType::Int32, ElementType::UInt8};

const ElementInfo& info(ElementType type) {
  // The H5T_* type ids are globals HDF5 sets up at library initialisation, hence a function-local table.
  static const ElementInfo table[] = {
      {"float32", H5T_NATIVE_FLOAT, H5T_IEEE_F32LE, H5T_FLOAT, 4, true},
      {"float64", H5T_NATIVE_DOUBLE, H5T_IEEE_F64LE, H5T_FLOAT, 8, true},
      {"int64", H5T_NATIVE_INT64, H5T_STD_I64LE, H5T_INTEGER, 8, true},
      {"int32", H5T_NATIVE_INT32, H5T_STD_I32LE, H5T_INTEGER, 4, true},
      {"uint8", H5T_NATIVE_UINT8, H5T_STD_U8LE, H5T_INTEGER, 1, false},
  };
  return table[static_cast<size_t>(type)];
}

bool holds(hid_t stored_type, ElementType type) {
  const ElementInfo& element = info(type);
  return H5Tget_class(stored_type) == element.type_class && H5Tget_size(stored_type) == element.size &&
         (element.type_class != H5T_INTEGER || (H5Tget_sign(stored_type) == H5T_SGN_2) == element.is_signed);
}

std::optional<ElementType> stored_element_type(hid_t stored_type) {
  for (ElementType type : kElementTypes) {
    if (holds(stored_type, type)) return type;
  }
  return std::nullopt;
}

std::string stored_type_name(hid_t stored_type) {
  if (auto type = stored_element_type(stored_type)) return element_type_name(*type);
  const size_t bits = 8 * H5Tget_size(stored_type);
  switch (H5Tget_class(stored_type)) {
    case H5T_INTEGER:
      return fmt::format("{}int{}", H5Tget_sign(stored_type) == H5T_SGN_NONE ? "u" : "", bits);
    case H5T_FLOAT:
      return fmt::format("float{}", bits);
    case H5T_STRING:
      return "string";
    case H5T_COMPOUND:
      return "compound";
    case H5T_ENUM:
      return "enum";
    case H5T_ARRAY:
      return "array";
    case H5T_VLEN:
      return "variable-length sequence";
    default:
      return "an unsupported type";
  }
}

const char* kind_name(H5I_type_t kind) {
  switch (kind) {
    case H5I_FILE:
    case H5I_GROUP:
      return "group";
    case H5I_DATASET:
      return "dataset";
    default:
      return "named datatype";
  }
}

std::string shape_string(const std::vector<hsize_t>& shape) { return fmt::format("[{}]", fmt::join(shape, ", ")); }

Handle make_dataspace(const std::vector<hsize_t>& shape, const std::vector<hsize_t>* max_shape = nullptr) {
  const hid_t id = shape.empty() ? H5Screate(H5S_SCALAR)
                                 : H5Screate_simple(static_cast<int>(shape.size()), shape.data(),
                                                    max_shape ? max_shape->data() : nullptr);
  return Handle(check(id, "cannot create an HDF5 dataspace of shape {}", shape_string(shape)), H5Sclose);
}

Handle make_plist(hid_t plist_class) {
  return Handle(check(H5Pcreate(plist_class), "cannot create an HDF5 property list"), H5Pclose);
}

// Variable-length strings in `charset`; a string read converts only between types of the same charset.
Handle variable_string_type(H5T_cset_t charset) {
  Handle type(check(H5Tcopy(H5T_C_S1), "cannot create an HDF5 string type"), H5Tclose);
  check(H5Tset_size(type.get(), H5T_VARIABLE), "cannot create an HDF5 string type");
  check(H5Tset_cset(type.get(), charset), "cannot create an HDF5 string type");
  return type;
}

Handle latest_format_access() {
  Handle plist = make_plist(H5P_FILE_ACCESS);
  check(H5Pset_libver_bounds(plist.get(), H5F_LIBVER_LATEST, H5F_LIBVER_LATEST),
        "cannot select the latest HDF5 file format");
  return plist;
}

// Link creation that makes missing parent groups, so "samples/0/kivi/x" can be written directly.
Handle intermediate_groups_plist() {
  Handle plist = make_plist(H5P_LINK_CREATE);
  check(H5Pset_create_intermediate_group(plist.get(), 1), "cannot configure HDF5 link creation");
  return plist;
}

// Chunked layout, with byte shuffling (when asked) and gzip when gzip_level > 0.
void set_chunked_layout(hid_t create_plist, const std::vector<hsize_t>& chunk, int gzip_level, bool shuffle,
                        const std::string& file_path, const std::string& dataset_path) {
  check(H5Pset_chunk(create_plist, static_cast<int>(chunk.size()), chunk.data()),
        "{}: dataset '{}': cannot use chunks of shape {}", file_path, dataset_path, shape_string(chunk));
  if (gzip_level == 0) return;
  if (shuffle)
    check(H5Pset_shuffle(create_plist), "{}: dataset '{}': cannot enable shuffling", file_path, dataset_path);
  check(H5Pset_deflate(create_plist, static_cast<unsigned>(gzip_level)), "{}: dataset '{}': cannot enable gzip",
        file_path, dataset_path);
}

void check_gzip_level(int gzip_level, const std::string& file_path, const std::string& dataset_path) {
  if (gzip_level < 0 || gzip_level > 9) {
    fail("{}: dataset '{}': gzip level {} is not in 0-9", file_path, dataset_path, gzip_level);
  }
}

// Chunk of a compressed fixed-size array: the whole array, its largest dimension halved until a
// chunk holds at most 1 MiB (HDF5 reads and decompresses whole chunks).
std::vector<hsize_t> compressed_chunk(std::vector<hsize_t> shape, size_t element_size) {
  constexpr hsize_t kMaxChunkBytes = hsize_t{1} << 20;
  while (Dataset::element_count(shape) * element_size > kMaxChunkBytes) {
    auto largest = std::max_element(shape.begin(), shape.end());
    *largest = (*largest + 1) / 2;
  }
  return shape;
}

// Appends fill a chunk a few rows at a time. A chunk that does not fit the chunk cache (1 MiB by
// default) would be read back, decompressed and recompressed on every append, so make room for two.
Handle appendable_access_plist(hsize_t chunk_bytes) {
  constexpr size_t kDefaultCacheBytes = size_t{1} << 20;
  Handle plist = make_plist(H5P_DATASET_ACCESS);
  check(H5Pset_chunk_cache(plist.get(), H5D_CHUNK_CACHE_NSLOTS_DEFAULT,
                           std::max<size_t>(kDefaultCacheBytes, 2 * chunk_bytes), H5D_CHUNK_CACHE_W0_DEFAULT),
        "cannot size the HDF5 chunk cache");
  return plist;
}

// Frees the strings HDF5 allocates for a variable-length read, even when the read fails halfway.
struct VariableLengthStrings {
  explicit VariableLengthStrings(size_t count) : pointers(count, nullptr) {}
  ~VariableLengthStrings() {
    for (char* pointer : pointers) {
      if (pointer) H5free_memory(pointer);
    }
  }
  std::vector<char*> pointers;
};

// Reads `count` strings of a dataset or attribute whose stored type is `stored_type`, variable- or
// fixed-length (h5py writes numpy bytes arrays fixed-length). `read(memory_type, buffer)` does the I/O.
template <typename ReadFn>
std::vector<std::string> read_string_values(hid_t stored_type, size_t count, ReadFn&& read) {
  std::vector<std::string> values;
  if (count == 0) return values;
  values.reserve(count);
  if (H5Tis_variable_str(stored_type) > 0) {
    const Handle memory_type = variable_string_type(H5Tget_cset(stored_type));
    VariableLengthStrings strings(count);
    read(memory_type.get(), strings.pointers.data());
    for (const char* pointer : strings.pointers) values.emplace_back(pointer ? pointer : "");
    return values;
  }
  const size_t size = H5Tget_size(stored_type);
  const Handle memory_type(check(H5Tcopy(stored_type), "cannot copy an HDF5 string type"), H5Tclose);
  std::vector<char> buffer(size * count);
  read(memory_type.get(), buffer.data());
  const bool space_padded = H5Tget_strpad(stored_type) == H5T_STR_SPACEPAD;
  for (size_t i = 0; i < count; ++i) {
    const char* begin = buffer.data() + i * size;
    std::string value(begin, std::find(begin, begin + size, '\0'));
    if (space_padded) value.erase(value.find_last_not_of(' ') + 1);
    values.push_back(std::move(value));
  }
  return values;
}

}  // namespace

const char* element_type_name(ElementType type) { return info(type).name; }

// --- Handle ---

Handle& Handle::operator=(Handle&& other) noexcept {
  if (this != &other) {
    reset();
    id_ = std::exchange(other.id_, H5I_INVALID_HID);
    close_ = other.close_;
  }
  return *this;
}

hid_t Handle::release() { return std::exchange(id_, H5I_INVALID_HID); }

void Handle::reset() {
  if (id_ >= 0 && close_) close_(id_);
  id_ = H5I_INVALID_HID;
}

// --- Object: attributes ---

std::string Object::describe() const { return fmt::format("{} '{}'", kind_name(H5Iget_type(id())), path_); }

std::string Object::absolute(const std::string& relative_path) const {
  if (!relative_path.empty() && relative_path.front() == '/') return relative_path;
  if (relative_path.empty() || relative_path == ".") return path_;
  return path_ == "/" ? "/" + relative_path : path_ + "/" + relative_path;
}

void Object::fail_int64_range(const std::string& name) const {
  fail("{}: attribute '{}' of {}: value does not fit in int64", file_path_, name, describe());
}

void Object::replace_attribute(const std::string& name, hid_t file_type, hid_t space, hid_t memory_type,
                               const void* data) {
  if (has_attribute(name)) {
    check(H5Adelete(id(), name.c_str()), "{}: cannot replace attribute '{}' of {}", file_path_, name, describe());
  }
  const Handle attribute(check(H5Acreate2(id(), name.c_str(), file_type, space, H5P_DEFAULT, H5P_DEFAULT),
                               "{}: cannot create attribute '{}' of {}", file_path_, name, describe()),
                         H5Aclose);
  if (H5Sget_simple_extent_npoints(space) == 0) return;
  check(H5Awrite(attribute.get(), memory_type, data), "{}: cannot write attribute '{}' of {}", file_path_, name,
        describe());
}

void Object::set_attribute(const std::string& name, const std::string& value) {
  if (value.find('\0') != std::string::npos) {
    fail("{}: attribute '{}' of {}: strings with NUL characters cannot be stored", file_path_, name, describe());
  }
  const Handle type = variable_string_type(H5T_CSET_UTF8);
  const char* text = value.c_str();
  replace_attribute(name, type.get(), make_dataspace({}).get(), type.get(), &text);
}

void Object::set_attribute(const std::string& name, double value) {
  const ElementInfo& element = info(ElementType::Float64);
  replace_attribute(name, element.file_type, make_dataspace({}).get(), element.memory_type, &value);
}

void Object::set_uint64_attribute(const std::string& name, uint64_t value) {
  replace_attribute(name, H5T_STD_U64LE, make_dataspace({}).get(), H5T_NATIVE_UINT64, &value);
}

std::optional<double> Object::numeric_attribute(const std::string& name) const {
  if (!has_attribute(name)) return std::nullopt;
  const Handle opened(check(H5Aopen(id(), name.c_str(), H5P_DEFAULT), "{}: cannot open attribute '{}' of {}",
                            file_path_, name, describe()),
                      H5Aclose);
  const Handle type(H5Aget_type(opened.get()), H5Tclose);
  const Handle space(H5Aget_space(opened.get()), H5Sclose);
  if (H5Sget_simple_extent_type(space.get()) != H5S_SCALAR) return std::nullopt;
  const H5T_class_t type_class = H5Tget_class(type.get());
  if (type_class == H5T_INTEGER) return static_cast<double>(attribute<int64_t>(name));
  if (type_class == H5T_FLOAT) return attribute<double>(name);
  return std::nullopt;
}

void Object::set_int64_attribute(const std::string& name, int64_t value) {
  const ElementInfo& element = info(ElementType::Int64);
  replace_attribute(name, element.file_type, make_dataspace({}).get(), element.memory_type, &value);
}

void Object::set_attribute(const std::string& name, const std::vector<double>& values) {
  const ElementInfo& element = info(ElementType::Float64);
  replace_attribute(name, element.file_type, make_dataspace({values.size()}).get(), element.memory_type, values.data());
}

void Object::set_attribute(const std::string& name, const std::vector<int64_t>& values) {
  const ElementInfo& element = info(ElementType::Int64);
  replace_attribute(name, element.file_type, make_dataspace({values.size()}).get(), element.memory_type, values.data());
}

struct Object::OpenedAttribute {
  Handle attribute;
  Handle stored_type;
  hsize_t value_count;
};

Object::OpenedAttribute Object::open_attribute(const std::string& name, H5T_class_t expected_class,
                                               const char* expected_name, bool scalar) const {
  if (!has_attribute(name)) fail("{}: {} has no attribute '{}'", file_path_, describe(), name);
  OpenedAttribute opened;
  opened.attribute = Handle(check(H5Aopen(id(), name.c_str(), H5P_DEFAULT), "{}: cannot open attribute '{}' of {}",
                                  file_path_, name, describe()),
                            H5Aclose);
  opened.stored_type = Handle(check(H5Aget_type(opened.attribute.get()),
                                    "{}: cannot read the type of attribute '{}' of {}", file_path_, name, describe()),
                              H5Tclose);
  if (H5Tget_class(opened.stored_type.get()) != expected_class) {
    fail("{}: attribute '{}' of {} holds {}, expected {}", file_path_, name, describe(),
         stored_type_name(opened.stored_type.get()), expected_name);
  }
  const Handle space(check(H5Aget_space(opened.attribute.get()), "{}: cannot read the shape of attribute '{}' of {}",
                           file_path_, name, describe()),
                     H5Sclose);
  opened.value_count = static_cast<hsize_t>(H5Sget_simple_extent_npoints(space.get()));
  if (scalar && opened.value_count != 1) {
    fail("{}: attribute '{}' of {} holds {} values, expected one", file_path_, name, describe(), opened.value_count);
  }
  return opened;
}

template <typename T>
std::vector<T> Object::read_numeric_attribute(const std::string& name, bool scalar) const {
  const ElementInfo& element = info(element_type_of<T>());
  const OpenedAttribute opened = open_attribute(name, element.type_class, element.name, scalar);
  std::vector<T> values(opened.value_count);
  if (!values.empty()) {
    check(H5Aread(opened.attribute.get(), element.memory_type, values.data()), "{}: cannot read attribute '{}' of {}",
          file_path_, name, describe());
  }
  return values;
}

template <>
std::string Object::attribute<std::string>(const std::string& name) const {
  const OpenedAttribute opened = open_attribute(name, H5T_STRING, "string", true);
  return read_string_values(opened.stored_type.get(), 1,
                            [&](hid_t memory_type, void* buffer) {
                              check(H5Aread(opened.attribute.get(), memory_type, buffer),
                                    "{}: cannot read attribute '{}' of {}", file_path_, name, describe());
                            })
      .front();
}

template <>
int64_t Object::attribute<int64_t>(const std::string& name) const {
  return read_numeric_attribute<int64_t>(name, true).front();
}

template <>
double Object::attribute<double>(const std::string& name) const {
  return read_numeric_attribute<double>(name, true).front();
}

template <>
std::vector<int64_t> Object::attribute<std::vector<int64_t>>(const std::string& name) const {
  return read_numeric_attribute<int64_t>(name, false);
}

template <>
std::vector<double> Object::attribute<std::vector<double>>(const std::string& name) const {
  return read_numeric_attribute<double>(name, false);
}

bool Object::has_attribute(const std::string& name) const {
  return check(H5Aexists(id(), name.c_str()), "{}: cannot look up attribute '{}' of {}", file_path_, name, describe()) >
         0;
}

std::vector<std::string> Object::attribute_names() const {
  std::vector<std::string> names;
  check(H5Aiterate2(
            id(), H5_INDEX_NAME, H5_ITER_INC, nullptr,
            [](hid_t, const char* name, const H5A_info_t*, void* out) -> herr_t {
              static_cast<std::vector<std::string>*>(out)->emplace_back(name);
              return 0;
            },
            &names),
        "{}: cannot list the attributes of {}", file_path_, describe());
  return names;
}

// --- Dataset ---

hsize_t Dataset::element_count(const std::vector<hsize_t>& shape) {
  hsize_t count = 1;
  for (hsize_t extent : shape) count *= extent;
  return count;
}

std::vector<hsize_t> Dataset::shape() const {
  const Handle space(check(H5Dget_space(id()), "{}: cannot read the shape of dataset '{}'", file_path_, path_),
                     H5Sclose);
  std::vector<hsize_t> dims(
      check(H5Sget_simple_extent_ndims(space.get()), "{}: cannot read the shape of dataset '{}'", file_path_, path_));
  if (!dims.empty()) H5Sget_simple_extent_dims(space.get(), dims.data(), nullptr);
  return dims;
}

std::string Dataset::type_name() const {
  const Handle type(check(H5Dget_type(id()), "{}: cannot read the type of dataset '{}'", file_path_, path_), H5Tclose);
  return stored_type_name(type.get());
}

std::vector<hsize_t> Dataset::checked_shape(ElementType expected) const {
  const Handle type(check(H5Dget_type(id()), "{}: cannot read the type of dataset '{}'", file_path_, path_), H5Tclose);
  if (!holds(type.get(), expected)) {
    fail("{}: dataset '{}' holds {}, expected {}", file_path_, path_, stored_type_name(type.get()),
         element_type_name(expected));
  }
  return shape();
}

void Dataset::read_into(ElementType type, void* out) const {
  check(H5Dread(id(), info(type).memory_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, out), "{}: cannot read dataset '{}'",
        file_path_, path_);
}

std::vector<std::string> Dataset::read_strings() const {
  const Handle type(check(H5Dget_type(id()), "{}: cannot read the type of dataset '{}'", file_path_, path_), H5Tclose);
  if (H5Tget_class(type.get()) != H5T_STRING) {
    fail("{}: dataset '{}' holds {}, expected string", file_path_, path_, stored_type_name(type.get()));
  }
  return read_string_values(type.get(), element_count(shape()), [&](hid_t memory_type, void* buffer) {
    check(H5Dread(id(), memory_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, buffer), "{}: cannot read dataset '{}'", file_path_,
          path_);
  });
}

std::string Dataset::read_string() const {
  std::vector<std::string> values = read_strings();
  if (values.size() != 1) {
    fail("{}: dataset '{}' holds {} strings, expected one", file_path_, path_, values.size());
  }
  return std::move(values.front());
}

// --- AppendableDataset ---

AppendableDataset::AppendableDataset(Handle handle, std::string file_path, std::string path, ElementType element_type,
                                     std::vector<hsize_t> row_shape)
    : Dataset(std::move(handle), std::move(file_path), std::move(path)),
      element_type_(element_type),
      row_shape_(std::move(row_shape)),
      row_values_(element_count(row_shape_)) {}

hsize_t AppendableDataset::rows() const { return shape().front(); }

hsize_t AppendableDataset::whole_rows(size_t value_count) const {
  if (value_count % row_values_ != 0) {
    fail("{}: dataset '{}': {} values are not whole rows of shape {}", file_path_, path_, value_count,
         shape_string(row_shape_));
  }
  return value_count / row_values_;
}

void AppendableDataset::append_raw(ElementType type, const void* rows, hsize_t count) {
  if (type != element_type_) {
    fail("{}: dataset '{}' holds {}, cannot append {} rows", file_path_, path_, element_type_name(element_type_),
         element_type_name(type));
  }
  if (count == 0) return;
  const std::vector<hsize_t> old_shape = shape();
  std::vector<hsize_t> new_shape = old_shape;
  new_shape[0] += count;
  check(H5Dset_extent(id(), new_shape.data()), "{}: cannot extend dataset '{}' to {} rows", file_path_, path_,
        new_shape[0]);
  try {
    const Handle file_space(check(H5Dget_space(id()), "{}: cannot read the shape of dataset '{}'", file_path_, path_),
                            H5Sclose);
    std::vector<hsize_t> start(new_shape.size(), 0);
    start[0] = old_shape[0];
    std::vector<hsize_t> block = new_shape;
    block[0] = count;
    check(H5Sselect_hyperslab(file_space.get(), H5S_SELECT_SET, start.data(), nullptr, block.data(), nullptr),
          "{}: cannot select rows {}..{} of dataset '{}'", file_path_, old_shape[0], new_shape[0], path_);
    const Handle memory_space = make_dataspace(block);
    check(H5Dwrite(id(), info(type).memory_type, memory_space.get(), file_space.get(), H5P_DEFAULT, rows),
          "{}: cannot append {} rows to dataset '{}'", file_path_, count, path_);
  } catch (const Error&) {
    H5Dset_extent(id(), old_shape.data());  // best effort; the error in flight says what went wrong
    throw;
  }
}

void AppendableDataset::truncate(hsize_t rows) {
  std::vector<hsize_t> dims = shape();
  if (rows > dims[0]) {
    fail("{}: cannot truncate dataset '{}' to {} rows: it has {}", file_path_, path_, rows, dims[0]);
  }
  dims[0] = rows;
  check(H5Dset_extent(id(), dims.data()), "{}: cannot truncate dataset '{}' to {} rows", file_path_, path_, rows);
}

void AppendableDataset::flush() { check(H5Dflush(id()), "{}: cannot flush dataset '{}'", file_path_, path_); }

// --- Group ---

bool Group::exists(const std::string& path) const {
  // H5Lexists fails, instead of answering false, when a parent is missing or is not a group: walk
  // the path one link at a time.
  std::string prefix = !path.empty() && path.front() == '/' ? "/" : "";
  for (size_t begin = 0; begin <= path.size();) {
    size_t end = path.find('/', begin);
    if (end == std::string::npos) end = path.size();
    const std::string component = path.substr(begin, end - begin);
    begin = end + 1;
    if (component.empty() || component == ".") continue;
    if (!prefix.empty() && prefix.back() != '/') prefix += '/';
    prefix += component;
    if (H5Lexists(id(), prefix.c_str(), H5P_DEFAULT) <= 0) {
      H5Eclear2(H5E_DEFAULT);
      return false;
    }
  }
  if (prefix.empty()) return true;  // this group itself
  // The last link may be a soft link to nothing.
  const htri_t resolves = H5Oexists_by_name(id(), prefix.c_str(), H5P_DEFAULT);
  H5Eclear2(H5E_DEFAULT);
  return resolves > 0;
}

void Group::require_kind(const std::string& path, H5I_type_t kind) const {
  if (!exists(path)) fail("{}: {} '{}' does not exist", file_path_, kind_name(kind), absolute(path));
  const Handle object(
      check(H5Oopen(id(), path.c_str(), H5P_DEFAULT), "{}: cannot open '{}'", file_path_, absolute(path)), H5Oclose);
  const H5I_type_t found = H5Iget_type(object.get());
  if (found != kind) {
    fail("{}: '{}' is a {}, not a {}", file_path_, absolute(path), kind_name(found), kind_name(kind));
  }
}

Group Group::create_group(const std::string& path) {
  const Handle link_plist = intermediate_groups_plist();
  const hid_t group = check(H5Gcreate2(id(), path.c_str(), link_plist.get(), H5P_DEFAULT, H5P_DEFAULT),
                            "{}: cannot create group '{}'", file_path_, absolute(path));
  return Group(Handle(group, H5Gclose), file_path_, absolute(path));
}

Group Group::open_group(const std::string& path) const {
  require_kind(path, H5I_GROUP);
  const hid_t group =
      check(H5Gopen2(id(), path.c_str(), H5P_DEFAULT), "{}: cannot open group '{}'", file_path_, absolute(path));
  return Group(Handle(group, H5Gclose), file_path_, absolute(path));
}

Group Group::require_group(const std::string& path) { return exists(path) ? open_group(path) : create_group(path); }

std::vector<std::string> Group::children() const {
  std::vector<std::string> names;
  check(H5Literate(
            id(), H5_INDEX_NAME, H5_ITER_INC, nullptr,
            [](hid_t, const char* name, const H5L_info_t*, void* out) -> herr_t {
              static_cast<std::vector<std::string>*>(out)->emplace_back(name);
              return 0;
            },
            &names),
        "{}: cannot list group '{}'", file_path_, path_);
  return names;
}

std::vector<std::string> Group::child_groups() const {
  std::vector<std::string> groups;
  for (const std::string& name : children()) {
    const Handle object(H5Oopen(id(), name.c_str(), H5P_DEFAULT), H5Oclose);
    if (object.get() >= 0 && H5Iget_type(object.get()) == H5I_GROUP) groups.push_back(name);
  }
  return groups;
}

void Group::remove(const std::string& name) {
  check(H5Ldelete(id(), name.c_str(), H5P_DEFAULT), "{}: cannot delete '{}' from group '{}'", file_path_, name, path_);
}

Handle Group::create_dataset(const std::string& path, hid_t file_type, hid_t space, hid_t create_plist,
                             hid_t access_plist) {
  if (exists(path)) {
    require_kind(path, H5I_DATASET);  // never replace a group, and everything under it, by a dataset
    check(H5Ldelete(id(), path.c_str(), H5P_DEFAULT), "{}: cannot replace dataset '{}'", file_path_, absolute(path));
  }
  const Handle link_plist = intermediate_groups_plist();
  return Handle(check(H5Dcreate2(id(), path.c_str(), file_type, space, link_plist.get(), create_plist, access_plist),
                      "{}: cannot create dataset '{}'", file_path_, absolute(path)),
                H5Dclose);
}

void Group::check_value_count(const std::string& path, size_t value_count, const std::vector<hsize_t>& shape) const {
  if (value_count != Dataset::element_count(shape)) {
    fail("{}: dataset '{}': {} values do not fill shape {}", file_path_, absolute(path), value_count,
         shape_string(shape));
  }
}

Dataset Group::write_raw(const std::string& path, ElementType type, const void* data, const std::vector<hsize_t>& shape,
                         int gzip_level) {
  check_gzip_level(gzip_level, file_path_, absolute(path));
  const ElementInfo& element = info(type);
  const Handle space = make_dataspace(shape);
  const Handle create_plist = make_plist(H5P_DATASET_CREATE);
  const hsize_t count = Dataset::element_count(shape);
  if (gzip_level > 0 && !shape.empty() && count > 0) {
    set_chunked_layout(create_plist.get(), compressed_chunk(shape, element.size), gzip_level, true, file_path_,
                       absolute(path));
  }
  Dataset dataset(create_dataset(path, element.file_type, space.get(), create_plist.get(), H5P_DEFAULT), file_path_,
                  absolute(path));
  if (count > 0) {
    check(H5Dwrite(dataset.id(), element.memory_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data),
          "{}: cannot write dataset '{}'", file_path_, absolute(path));
  }
  return dataset;
}

Dataset Group::write_string_array(const std::string& path, const std::vector<std::string>& values,
                                  const std::vector<hsize_t>& shape) {
  std::vector<const char*> pointers;
  pointers.reserve(values.size());
  for (const std::string& value : values) {
    if (value.find('\0') != std::string::npos) {
      fail("{}: dataset '{}': strings with NUL characters cannot be stored", file_path_, absolute(path));
    }
    pointers.push_back(value.c_str());
  }
  const Handle type = variable_string_type(H5T_CSET_UTF8);
  const Handle space = make_dataspace(shape);
  Dataset dataset(create_dataset(path, type.get(), space.get(), H5P_DEFAULT, H5P_DEFAULT), file_path_, absolute(path));
  if (!pointers.empty()) {
    check(H5Dwrite(dataset.id(), type.get(), H5S_ALL, H5S_ALL, H5P_DEFAULT, pointers.data()),
          "{}: cannot write dataset '{}'", file_path_, absolute(path));
  }
  return dataset;
}

Dataset Group::write_strings(const std::string& path, const std::vector<std::string>& values) {
  return write_string_array(path, values, {values.size()});
}

Dataset Group::write_string(const std::string& path, const std::string& value) {
  return write_string_array(path, {value}, {});
}

Dataset Group::open_dataset(const std::string& path) const {
  require_kind(path, H5I_DATASET);
  const hid_t dataset =
      check(H5Dopen2(id(), path.c_str(), H5P_DEFAULT), "{}: cannot open dataset '{}'", file_path_, absolute(path));
  return Dataset(Handle(dataset, H5Dclose), file_path_, absolute(path));
}

AppendableDataset Group::create_appendable_raw(const std::string& path, ElementType type,
                                               const std::vector<hsize_t>& row_shape,
                                               const AppendableOptions& options) {
  check_gzip_level(options.gzip_level, file_path_, absolute(path));
  if (options.chunk_rows == 0) fail("{}: dataset '{}': chunk_rows must be positive", file_path_, absolute(path));
  if (std::count(row_shape.begin(), row_shape.end(), 0) > 0) {
    fail("{}: dataset '{}': row shape {} has an empty dimension", file_path_, absolute(path), shape_string(row_shape));
  }
  std::vector<hsize_t> shape = {0}, max_shape = {H5S_UNLIMITED}, chunk = {options.chunk_rows};
  shape.insert(shape.end(), row_shape.begin(), row_shape.end());
  max_shape.insert(max_shape.end(), row_shape.begin(), row_shape.end());
  chunk.insert(chunk.end(), row_shape.begin(), row_shape.end());

  const ElementInfo& element = info(type);
  const Handle space = make_dataspace(shape, &max_shape);
  const Handle create_plist = make_plist(H5P_DATASET_CREATE);
  set_chunked_layout(create_plist.get(), chunk, options.gzip_level, options.shuffle, file_path_, absolute(path));
  const Handle access_plist = appendable_access_plist(Dataset::element_count(chunk) * element.size);
  return AppendableDataset(create_dataset(path, element.file_type, space.get(), create_plist.get(), access_plist.get()),
                           file_path_, absolute(path), type, row_shape);
}

AppendableDataset Group::open_appendable(const std::string& path) const {
  // A first look at the dataset gives its type, shape and chunk size; then it is reopened with a
  // chunk cache that fits its chunks.
  ElementType type;
  std::vector<hsize_t> shape;
  hsize_t chunk_bytes = 0;
  {
    const Dataset dataset = open_dataset(path);
    const Handle stored_type(
        check(H5Dget_type(dataset.id()), "{}: cannot read the type of dataset '{}'", file_path_, dataset.path()),
        H5Tclose);
    const std::optional<ElementType> element_type = stored_element_type(stored_type.get());
    if (!element_type) {
      fail("{}: dataset '{}' holds {}, which cannot be appended to", file_path_, dataset.path(),
           stored_type_name(stored_type.get()));
    }
    type = *element_type;
    const Handle space(
        check(H5Dget_space(dataset.id()), "{}: cannot read the shape of dataset '{}'", file_path_, dataset.path()),
        H5Sclose);
    const int rank = check(H5Sget_simple_extent_ndims(space.get()), "{}: cannot read the shape of dataset '{}'",
                           file_path_, dataset.path());
    shape.resize(rank);
    std::vector<hsize_t> max_shape(rank);
    H5Sget_simple_extent_dims(space.get(), shape.data(), max_shape.data());
    if (shape.empty() || max_shape[0] != H5S_UNLIMITED) {
      fail("{}: dataset '{}' of shape {} is not appendable: axis 0 is not unlimited", file_path_, dataset.path(),
           shape_string(shape));
    }
    const Handle create_plist(check(H5Dget_create_plist(dataset.id()), "{}: cannot read the layout of dataset '{}'",
                                    file_path_, dataset.path()),
                              H5Pclose);
    std::vector<hsize_t> chunk(shape.size());
    check(H5Pget_chunk(create_plist.get(), static_cast<int>(chunk.size()), chunk.data()),
          "{}: cannot read the chunk shape of dataset '{}'", file_path_, dataset.path());
    chunk_bytes = Dataset::element_count(chunk) * info(type).size;
  }
  const Handle access_plist = appendable_access_plist(chunk_bytes);
  const hid_t dataset = check(H5Dopen2(id(), path.c_str(), access_plist.get()), "{}: cannot open dataset '{}'",
                              file_path_, absolute(path));
  return AppendableDataset(Handle(dataset, H5Dclose), file_path_, absolute(path), type,
                           std::vector<hsize_t>(shape.begin() + 1, shape.end()));
}

// --- File ---

void write_new_file(const std::string& path, bool replace, const std::function<void(File&)>& write) {
  // One writer per output: a second command writing the same file would truncate this one's partial.
  const WriterLock lock(output_lock_path(path), path, "wait for it to end, or name another output");
  const std::string partial = path + ".partial";
  try {
    File file = File::create(partial, /*truncate=*/true);
    write(file);
    file.close();
    // Without `replace`, a file that appeared meanwhile (made by something that takes no lock) stays.
    int renamed = ::renameat2(AT_FDCWD, partial.c_str(), AT_FDCWD, path.c_str(), replace ? 0 : RENAME_NOREPLACE);
    if (renamed != 0 && errno == EINVAL && !replace) {
      // A file system without RENAME_NOREPLACE (some NFS): check, then rename; the lock still keeps
      // kvdrift's own writers apart.
      if (std::filesystem::exists(path))
        errno = EEXIST;
      else
        renamed = ::rename(partial.c_str(), path.c_str());
    }
    if (renamed != 0) {
      if (errno == EEXIST)
        fail("{} was created by another process while this command wrote it; pass --overwrite to replace it", path);
      fail("cannot rename {} to {}: {}", partial, path, std::strerror(errno));
    }
  } catch (...) {
    std::error_code error;
    std::filesystem::remove(partial, error);
    throw;
  }
}

void reserve_space(const std::string& path, uint64_t bytes) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CLOEXEC);
  if (fd < 0) fail("{}: cannot open to reserve disk space: {}", path, std::strerror(errno));
  struct stat status {};
  int error = ::fstat(fd, &status) == 0 ? 0 : errno;
  if (error == 0) {
    error = ::posix_fallocate(fd, status.st_size, static_cast<off_t>(bytes));
    // Where the file system cannot allocate, glibc writes the blocks one by one and may stop partway.
    if (error != 0 && ::ftruncate(fd, status.st_size) != 0) error = errno;
  }
  ::close(fd);
  if (error != 0) {
    fail("{}: cannot reserve {:.1f} MiB of disk space for the next writes: {}", path,
         static_cast<double>(bytes) / (1 << 20), std::strerror(error));
  }
}

File File::open(const std::string& path, unsigned flags, hid_t access_plist, const char* purpose) {
  silence_error_printing();
  std::error_code error;
  if (!std::filesystem::exists(path, error) && !error) {
    fail("cannot open HDF5 file {} for {}: no such file", path, purpose);
  }
  const hid_t file =
      check(H5Fopen(path.c_str(), flags, access_plist), "cannot open HDF5 file {} for {}", path, purpose);
  return File(Handle(file, H5Fclose), path);
}

File File::create(const std::string& path, bool truncate) {
  silence_error_printing();
  // An output's missing folders are made, as a user expects from `--output out/run.h5`.
  const auto parent = std::filesystem::path(path).parent_path();
  std::error_code error;
  if (!parent.empty() && !std::filesystem::is_directory(parent, error)) {
    std::filesystem::create_directories(parent, error);
    if (error) fail("cannot create HDF5 file {}: cannot create its folder {}: {}", path, parent.string(), error.message());
  }
  const Handle access_plist = latest_format_access();
  const hid_t file =
      check(H5Fcreate(path.c_str(), truncate ? H5F_ACC_TRUNC : H5F_ACC_EXCL, H5P_DEFAULT, access_plist.get()),
            "cannot create HDF5 file {}", path);
  return File(Handle(file, H5Fclose), path);
}

File File::open_read(const std::string& path, bool swmr_read) {
  return open(path, H5F_ACC_RDONLY | (swmr_read ? H5F_ACC_SWMR_READ : 0u), H5P_DEFAULT,
              swmr_read ? "SWMR reading" : "reading");
}

File File::open_read_write(const std::string& path) {
  // The latest format bounds, as at creation, so that start_swmr_write works on a reopened file.
  const Handle access_plist = latest_format_access();
  return open(path, H5F_ACC_RDWR, access_plist.get(), "writing");
}

File File::recover_read_write(const std::string& path) {
  const Handle access_plist = latest_format_access();
  // How h5clear clears the "open for write" flags: a file-access property HDF5 registers but does
  // not declare in its headers.
  hbool_t clear_status_flags = true;
  check(H5Pset(access_plist.get(), "clear_status_flags", &clear_status_flags), "cannot open HDF5 file {} for recovery",
        path);
  File file = open(path, H5F_ACC_RDWR, access_plist.get(), "recovery");
  // The superblock's end of allocation predates the chunks the killed writer wrote since, and
  // closing would truncate the file there.
  check(H5Fincrement_filesize(file.id(), 0), "{}: cannot move the end of allocation to the end of the file", path);
  return file;
}

bool is_hdf5_file(const std::string& path) {
  static constexpr std::array<char, 8> kSignature = {'\x89', 'H', 'D', 'F', '\r', '\n', '\x1a', '\n'};
  std::ifstream in(path, std::ios::binary);
  std::array<char, 8> bytes{};
  for (uint64_t offset = 0; in.seekg(static_cast<std::streamoff>(offset)) && in.read(bytes.data(), bytes.size());
       offset = offset == 0 ? 512 : offset * 2) {
    if (bytes == kSignature) return true;
  }
  return false;
}

void File::flush() { check(H5Fflush(id(), H5F_SCOPE_LOCAL), "{}: cannot flush", file_path_); }

void File::start_swmr_write() { check(H5Fstart_swmr_write(id()), "{}: cannot start SWMR writing", file_path_); }

void File::close() { check(H5Fclose(handle_.release()), "{}: cannot close", file_path_); }

}  // namespace kvdrift::h5
