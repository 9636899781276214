#include "io/hdf5.h"

#include <gtest/gtest.h>
#include <hdf5.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "core/error.h"
#include "support.h"

namespace kvdrift {
namespace {

using h5::AppendableDataset;
using h5::Dataset;
using h5::File;
using h5::Group;
using test::read_file;
using test::scratch_dir;
using test::write_file;

using test::error_message;
using test::run_python;

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

// `count` distinct values of T, led by the extremes of the type so a lossy round trip shows.
template <typename T>
std::vector<T> sample_values(size_t count) {
  std::vector<T> values;
  const std::vector<T> extremes = {std::numeric_limits<T>::lowest(), std::numeric_limits<T>::max(),
                                   std::numeric_limits<T>::is_integer ? T(0) : std::numeric_limits<T>::denorm_min()};
  for (size_t i = 0; i < count; ++i) {
    if (i < extremes.size()) {
      values.push_back(extremes[i]);
    } else if constexpr (std::numeric_limits<T>::is_integer) {
      values.push_back(static_cast<T>((i * 37) % 200));
    } else {
      values.push_back(static_cast<T>(i) * T(0.37) - T(3));
    }
  }
  return values;
}

// Runs `script` (written as `dir`/`name`.py) with the project's .venv Python and `args`; returns the exit
// status and leaves stdout and stderr together in *output.
template <typename T>
void expect_round_trip(Group& group, const std::string& path, const std::vector<hsize_t>& shape, int gzip_level) {
  const std::vector<T> values = sample_values<T>(Dataset::element_count(shape));
  const Dataset written = group.write(path, values, shape, gzip_level);
  EXPECT_EQ(written.shape(), shape) << path;
  std::vector<hsize_t> shape_read;
  EXPECT_EQ(group.read<T>(path, &shape_read), values) << path;
  EXPECT_EQ(shape_read, shape) << path;
  EXPECT_EQ(group.shape(path), shape) << path;
  EXPECT_EQ(group.rank(path), static_cast<int>(shape.size())) << path;
  EXPECT_EQ(group.open_dataset(path).type_name(), h5::element_type_name(h5::element_type_of<T>())) << path;
}

template <typename T>
void round_trip_every_rank(Group& group, const std::string& type_name) {
  const std::vector<std::vector<hsize_t>> shapes = {{}, {7}, {2, 3}, {2, 3, 4}, {3, 1, 2, 5}, {0, 3}};
  for (size_t i = 0; i < shapes.size(); ++i) {
    expect_round_trip<T>(group, type_name + "/plain" + std::to_string(i), shapes[i], 0);
    expect_round_trip<T>(group, type_name + "/gzip" + std::to_string(i), shapes[i], 6);
  }
}

TEST(Hdf5, RoundTripsEveryElementTypeAndRank) {
  const std::string path = scratch_dir() + "/arrays.h5";
  {
    File file = File::create(path, true);
    round_trip_every_rank<float>(file, "float32");
    round_trip_every_rank<double>(file, "float64");
    round_trip_every_rank<int64_t>(file, "int64");
    round_trip_every_rank<int32_t>(file, "int32");
    round_trip_every_rank<uint8_t>(file, "uint8");
  }
  // And again from a fresh read-only open, which reads what is on disk.
  const File file = File::open_read(path);
  EXPECT_EQ(file.children(), (std::vector<std::string>{"float32", "float64", "int32", "int64", "uint8"}));
  EXPECT_EQ(file.read<double>("float64/gzip3"), sample_values<double>(2 * 3 * 4));
  EXPECT_EQ(file.read<uint8_t>("uint8/plain1"), sample_values<uint8_t>(7));
  std::vector<hsize_t> shape;
  EXPECT_EQ(file.read<int32_t>("int32/gzip0", &shape), sample_values<int32_t>(1));
  EXPECT_TRUE(shape.empty());
  EXPECT_EQ(file.rank("int32/gzip0"), 0);
  EXPECT_TRUE(file.read<float>("float32/plain5", &shape).empty());
  EXPECT_EQ(shape, (std::vector<hsize_t>{0, 3}));
}

TEST(Hdf5, GzipStoresLargeArraysChunkedShuffledAndCompressed) {
  const std::string path = scratch_dir() + "/large.h5";
  File file = File::create(path, true);
  // 2.9 MB of slowly varying values: more than one 1 MiB chunk, and very compressible.
  std::vector<float> values(700 * 1024);
  for (size_t i = 0; i < values.size(); ++i) values[i] = static_cast<float>(i / 100);
  const Dataset dataset = file.write("big", values, {700, 1024}, 4);
  const Dataset plain = file.write("plain", values, {700, 1024});

  const hid_t create_plist = H5Dget_create_plist(dataset.id());
  EXPECT_EQ(H5Pget_layout(create_plist), H5D_CHUNKED);
  EXPECT_EQ(H5Pget_nfilters(create_plist), 2);  // shuffle, then deflate
  hsize_t chunk[2];
  ASSERT_EQ(H5Pget_chunk(create_plist, 2, chunk), 2);
  EXPECT_LE(chunk[0] * chunk[1] * sizeof(float), hsize_t{1} << 20);
  H5Pclose(create_plist);
  EXPECT_LT(H5Dget_storage_size(dataset.id()), values.size() * sizeof(float) / 10);
  EXPECT_EQ(H5Dget_storage_size(plain.id()), values.size() * sizeof(float));

  EXPECT_EQ(file.read<float>("big"), values);
  EXPECT_EQ(error_message([&] {
              file.write("bad", values, {700, 1024}, 10);
            }),
            path + ": dataset '/bad': gzip level 10 is not in 0-9");
  EXPECT_EQ(error_message([&] {
              file.write("short", values, {701, 1024});
            }),
            path + ": dataset '/short': 716800 values do not fill shape [701, 1024]");
}

TEST(Hdf5, AttributesOfEveryKindOnFilesGroupsAndDatasets) {
  const std::string path = scratch_dir() + "/attributes.h5";
  {
    File file = File::create(path, true);
    Group group = file.create_group("samples/0");
    Dataset dataset = group.write("tokens", std::vector<int64_t>{1, 2, 3}, {3});
    for (h5::Object* object : std::vector<h5::Object*>{&file, &group, &dataset}) {
      object->set_attribute("text", "héllo ✓ world");
      object->set_attribute("std_string", std::string("yaml: [1, 2]\nnext: line"));
      object->set_attribute("int64", std::numeric_limits<int64_t>::min());
      object->set_attribute("plain_int", 42);
      object->set_attribute("size", size_t{123456789012});
      object->set_attribute("double", -0.125);
      object->set_attribute("doubles", std::vector<double>{1.5, -2.25, 1e300});
      object->set_attribute("int64s", std::vector<int64_t>{-1, 0, std::numeric_limits<int64_t>::max()});
      object->set_attribute("no_doubles", std::vector<double>{});
      // Overwriting replaces the old value, even with another type and size.
      object->set_attribute("replaced", "first");
      object->set_attribute("replaced", std::vector<int64_t>{7, 8});
    }
  }
  const File file = File::open_read(path);
  const Group group = file.open_group("samples/0");
  const Dataset dataset = group.open_dataset("tokens");
  for (const h5::Object* object : std::vector<const h5::Object*>{&file, &group, &dataset}) {
    SCOPED_TRACE(object->path());
    EXPECT_EQ(object->attribute<std::string>("text"), "héllo ✓ world");
    EXPECT_EQ(object->attribute<std::string>("std_string"), "yaml: [1, 2]\nnext: line");
    EXPECT_EQ(object->attribute<int64_t>("int64"), std::numeric_limits<int64_t>::min());
    EXPECT_EQ(object->attribute<int64_t>("plain_int"), 42);
    EXPECT_EQ(object->attribute<int64_t>("size"), 123456789012);
    EXPECT_EQ(object->attribute<double>("double"), -0.125);
    EXPECT_EQ(object->attribute<std::vector<double>>("doubles"), (std::vector<double>{1.5, -2.25, 1e300}));
    EXPECT_EQ(object->attribute<std::vector<int64_t>>("int64s"),
              (std::vector<int64_t>{-1, 0, std::numeric_limits<int64_t>::max()}));
    EXPECT_TRUE(object->attribute<std::vector<double>>("no_doubles").empty());
    EXPECT_EQ(object->attribute<std::vector<int64_t>>("replaced"), (std::vector<int64_t>{7, 8}));
    // A scalar reads as a one-element vector.
    EXPECT_EQ(object->attribute<std::vector<double>>("double"), std::vector<double>{-0.125});
    EXPECT_TRUE(object->has_attribute("int64"));
    EXPECT_FALSE(object->has_attribute("missing"));
    EXPECT_EQ(object->attribute_names(),
              (std::vector<std::string>{"double", "doubles", "int64", "int64s", "no_doubles", "plain_int", "replaced",
                                        "size", "std_string", "text"}));
  }
}

TEST(Hdf5, AttributeErrorsNameFileObjectAndAttribute) {
  const std::string path = scratch_dir() + "/attributes.h5";
  File file = File::create(path, true);
  Group group = file.create_group("run");
  group.set_attribute("name", "kivi");
  group.set_attribute("steps", std::vector<int64_t>{1, 2, 3});
  EXPECT_EQ(error_message([&] { group.attribute<int64_t>("seed"); }), path + ": group '/run' has no attribute 'seed'");
  EXPECT_EQ(error_message([&] { group.attribute<double>("name"); }),
            path + ": attribute 'name' of group '/run' holds string, expected float64");
  EXPECT_EQ(error_message([&] { group.attribute<int64_t>("steps"); }),
            path + ": attribute 'steps' of group '/run' holds 3 values, expected one");
  EXPECT_EQ(error_message([&] { group.attribute<std::string>("steps"); }),
            path + ": attribute 'steps' of group '/run' holds int64, expected string");
  EXPECT_EQ(error_message([&] { group.set_attribute("huge", std::numeric_limits<uint64_t>::max()); }),
            path + ": attribute 'huge' of group '/run': value does not fit in int64");
  const Dataset dataset = file.write("x", std::vector<float>{1}, {1});
  EXPECT_EQ(error_message([&] { dataset.attribute<double>("scale"); }),
            path + ": dataset '/x' has no attribute 'scale'");
}

TEST(Hdf5, StringDatasets) {
  const std::string path = scratch_dir() + "/strings.h5";
  const std::vector<std::string> texts = {"Once upon a time", "", "naïve café ✓", "line one\nline two"};
  {
    File file = File::create(path, true);
    EXPECT_EQ(file.write_strings("prompt/texts", texts).shape(), std::vector<hsize_t>{4});
    EXPECT_EQ(file.write_string("config", "model: stories260K\nseed: 1\n").rank(), 0);
    file.write_strings("none", {});
    EXPECT_EQ(error_message([&] { file.write_string("nul", std::string("a\0b", 3)); }),
              path + ": dataset '/nul': strings with NUL characters cannot be stored");
  }
  const File file = File::open_read(path);
  EXPECT_EQ(file.read_strings("prompt/texts"), texts);
  EXPECT_EQ(file.read_string("config"), "model: stories260K\nseed: 1\n");
  EXPECT_EQ(file.read_strings("config"), std::vector<std::string>{"model: stories260K\nseed: 1\n"});
  EXPECT_TRUE(file.read_strings("none").empty());
  EXPECT_EQ(file.shape("none"), std::vector<hsize_t>{0});
  EXPECT_EQ(file.open_dataset("config").type_name(), "string");
  EXPECT_EQ(error_message([&] { file.read_string("prompt/texts"); }),
            path + ": dataset '/prompt/texts' holds 4 strings, expected one");
  EXPECT_EQ(error_message([&] { file.read<float>("config"); }),
            path + ": dataset '/config' holds string, expected float32");
}

TEST(Hdf5, WrongTypeReadNamesFileDatasetAndBothTypes) {
  const std::string path = scratch_dir() + "/types.h5";
  File file = File::create(path, true);
  file.write("tokens", std::vector<int64_t>{1, 2}, {2});
  file.write("codes", std::vector<uint8_t>{1, 2}, {2});
  file.write("logits", std::vector<float>{1, 2}, {2});
  EXPECT_EQ(error_message([&] { file.read<float>("tokens"); }),
            path + ": dataset '/tokens' holds int64, expected float32");
  EXPECT_EQ(error_message([&] { file.read<int32_t>("tokens"); }),
            path + ": dataset '/tokens' holds int64, expected int32");
  EXPECT_EQ(error_message([&] { file.read<int64_t>("codes"); }),
            path + ": dataset '/codes' holds uint8, expected int64");
  EXPECT_EQ(error_message([&] { file.read<double>("logits"); }),
            path + ": dataset '/logits' holds float32, expected float64");
  EXPECT_EQ(error_message([&] { file.read_strings("logits"); }),
            path + ": dataset '/logits' holds float32, expected string");
}

TEST(Hdf5, MissingDatasetNamesFileAndDataset) {
  const std::string path = scratch_dir() + "/missing.h5";
  File file = File::create(path, true);
  Group kivi = file.create_group("samples/0/kivi");
  file.write("samples/0/tokens", std::vector<int64_t>{5}, {1});
  EXPECT_EQ(error_message([&] { file.read<float>("samples/0/kl"); }),
            path + ": dataset '/samples/0/kl' does not exist");
  EXPECT_EQ(error_message([&] { file.read<float>("samples/7/kl"); }),
            path + ": dataset '/samples/7/kl' does not exist");
  // Relative to a group, the message still gives the path from the root.
  EXPECT_EQ(error_message([&] { kivi.shape("teacher_forced/kl"); }),
            path + ": dataset '/samples/0/kivi/teacher_forced/kl' does not exist");
  EXPECT_EQ(error_message([&] { file.read<float>("samples/0/tokens/kl"); }),
            path + ": dataset '/samples/0/tokens/kl' does not exist");
  EXPECT_EQ(error_message([&] { file.open_dataset("samples/0"); }), path + ": '/samples/0' is a group, not a dataset");
  EXPECT_EQ(error_message([&] { file.open_group("samples/0/tokens"); }),
            path + ": '/samples/0/tokens' is a dataset, not a group");
  EXPECT_EQ(error_message([&] { file.open_group("samples/1"); }), path + ": group '/samples/1' does not exist");
}

TEST(Hdf5, MissingOrInvalidFileErrorsNameTheFile) {
  const std::string dir = scratch_dir();
  EXPECT_EQ(error_message([&] { File::open_read(dir + "/absent.h5"); }),
            "cannot open HDF5 file " + dir + "/absent.h5 for reading: no such file");
  EXPECT_EQ(error_message([&] { File::open_read_write(dir + "/absent.h5"); }),
            "cannot open HDF5 file " + dir + "/absent.h5 for writing: no such file");
  write_file(dir + "/text.h5", "not an HDF5 file at all");
  const std::string not_hdf5 = error_message([&] { File::open_read(dir + "/text.h5"); });
  EXPECT_TRUE(contains(not_hdf5, "cannot open HDF5 file " + dir + "/text.h5 for reading (HDF5: ")) << not_hdf5;
  EXPECT_TRUE(contains(not_hdf5, "signature")) << not_hdf5;  // HDF5's reason: no file signature found
  const std::string exists = error_message([&] { File::create(dir + "/text.h5", false); });
  EXPECT_TRUE(contains(exists, "cannot create HDF5 file " + dir + "/text.h5 (HDF5: ")) << exists;
  EXPECT_TRUE(contains(exists, "File exists")) << exists;
  // Missing folders are made; a folder that cannot be made is named.
  File::create(dir + "/no/such/dir/out.h5", true);
  EXPECT_TRUE(std::filesystem::is_regular_file(dir + "/no/such/dir/out.h5"));
  const std::string no_dir = error_message([&] { File::create(dir + "/text.h5/sub/out.h5", true); });
  EXPECT_EQ(no_dir, "cannot create HDF5 file " + dir + "/text.h5/sub/out.h5: cannot create its folder " + dir +
                        "/text.h5/sub: Not a directory");
}

TEST(Hdf5, NestedGroupsExistsAndChildren) {
  const std::string path = scratch_dir() + "/groups.h5";
  File file = File::create(path, true);
  Group lane = file.create_group("samples/0/kivi/teacher_forced");
  EXPECT_EQ(lane.path(), "/samples/0/kivi/teacher_forced");
  EXPECT_EQ(lane.file_path(), path);
  for (const char* present : {"samples", "samples/0", "samples/0/kivi", "/samples/0/kivi/teacher_forced", "", "/"}) {
    EXPECT_TRUE(file.exists(present)) << present;
  }
  lane.write("kl", std::vector<float>{0.5f}, {1});
  for (const char* absent :
       {"samples/1", "samples/1/kivi", "samples/0/kivi/static", "samples/0/kivi/teacher_forced/kl/x", "other"}) {
    EXPECT_FALSE(file.exists(absent)) << absent;
  }
  const Group sample = file.open_group("samples/0");
  EXPECT_TRUE(sample.exists("kivi/teacher_forced/kl"));
  EXPECT_TRUE(sample.exists("/samples"));  // absolute paths work from any group

  Group samples = file.require_group("samples");
  for (const char* name : {"10", "2", "1"}) samples.require_group(std::string(name) + "/kvarn");
  samples.require_group("0/kivi/static");
  EXPECT_EQ(samples.children(), (std::vector<std::string>{"0", "1", "10", "2"}));
  EXPECT_EQ(file.open_group("samples/0/kivi").children(), (std::vector<std::string>{"static", "teacher_forced"}));
  EXPECT_EQ(lane.children(), std::vector<std::string>{"kl"});
  EXPECT_EQ(file.children(), std::vector<std::string>{"samples"});
  EXPECT_EQ(samples.require_group("2").path(), "/samples/2");
  EXPECT_EQ(samples.open_group("/samples/10/kvarn").path(), "/samples/10/kvarn");

  const std::string duplicate = error_message([&] { file.create_group("samples/0"); });
  EXPECT_TRUE(contains(duplicate, path + ": cannot create group '/samples/0' (HDF5: ")) << duplicate;
}

TEST(Hdf5, WriteReplacesAnExistingDatasetButNeverAGroup) {
  const std::string path = scratch_dir() + "/replace.h5";
  File file = File::create(path, true);
  file.write("summary/kl", std::vector<float>{1, 2, 3}, {3});
  file.write("summary/kl", std::vector<int64_t>{4, 5, 6, 7}, {2, 2});
  EXPECT_EQ(file.read<int64_t>("summary/kl"), (std::vector<int64_t>{4, 5, 6, 7}));
  EXPECT_EQ(file.shape("summary/kl"), (std::vector<hsize_t>{2, 2}));
  EXPECT_EQ(error_message([&] { file.write_string("summary", "text"); }),
            path + ": '/summary' is a group, not a dataset");
  EXPECT_EQ(file.read<int64_t>("summary/kl").size(), 4u);
}

// Appends three batches of rows, checking shape and contents after each, then truncates and appends again.
template <typename T>
void append_truncate_append(Group& group, const std::string& path, const std::vector<hsize_t>& row_shape) {
  SCOPED_TRACE(path);
  const hsize_t row_values = Dataset::element_count(row_shape);
  AppendableDataset dataset = group.create_appendable<T>(path, row_shape, {4, 4, true});
  EXPECT_EQ(dataset.element_type(), h5::element_type_of<T>());
  EXPECT_EQ(dataset.row_shape(), row_shape);
  std::vector<hsize_t> expected_shape = {0};
  expected_shape.insert(expected_shape.end(), row_shape.begin(), row_shape.end());
  EXPECT_EQ(dataset.shape(), expected_shape);

  const std::vector<T> all = sample_values<T>(12 * row_values);
  hsize_t rows = 0;
  for (hsize_t count : {1, 6, 3}) {  // within a chunk, across chunks, then filling up to the boundary
    const std::vector<T> batch(all.begin() + rows * row_values, all.begin() + (rows + count) * row_values);
    if (count == 6) {
      dataset.append(batch);
    } else {
      dataset.append(batch.data(), count);
    }
    rows += count;
    expected_shape[0] = rows;
    EXPECT_EQ(dataset.rows(), rows);
    EXPECT_EQ(dataset.shape(), expected_shape);
    EXPECT_EQ(group.shape(path), expected_shape);
    EXPECT_EQ(dataset.read<T>(), std::vector<T>(all.begin(), all.begin() + rows * row_values));
  }

  dataset.truncate(4);
  expected_shape[0] = 4;
  EXPECT_EQ(dataset.shape(), expected_shape);
  EXPECT_EQ(dataset.read<T>(), std::vector<T>(all.begin(), all.begin() + 4 * row_values));
  const std::vector<T> redo = sample_values<T>(17 * row_values);  // different values from all[4..]
  dataset.append(redo.data() + 10 * row_values, 2);
  std::vector<T> expected(all.begin(), all.begin() + 4 * row_values);
  expected.insert(expected.end(), redo.begin() + 10 * row_values, redo.begin() + 12 * row_values);
  EXPECT_EQ(dataset.read<T>(), expected);
  EXPECT_EQ(dataset.rows(), 6u);
}

TEST(Hdf5, AppendableDatasetsGrowTruncateAndGrowAgain) {
  const std::string path = scratch_dir() + "/steps.h5";
  File file = File::create(path, true);
  Group steps = file.create_group("steps");
  append_truncate_append<float>(steps, "kl", {2, 3});
  append_truncate_append<double>(steps, "logp_gap", {});
  append_truncate_append<int64_t>(steps, "tokens", {});
  append_truncate_append<int32_t>(steps, "layer_argmax", {5});
  append_truncate_append<uint8_t>(steps, "match", {});
  append_truncate_append<float>(steps, "lanes/attention_error", {3, 2, 2});
}

TEST(Hdf5, AppendableDatasetLayoutAndErrors) {
  const std::string path = scratch_dir() + "/steps.h5";
  File file = File::create(path, true);
  AppendableDataset kl = file.create_appendable<float>("kl", {8});
  const hid_t create_plist = H5Dget_create_plist(kl.id());
  hsize_t chunk[2];
  ASSERT_EQ(H5Pget_chunk(create_plist, 2, chunk), 2);
  EXPECT_EQ(chunk[0], 64u);  // the default chunk_rows
  EXPECT_EQ(chunk[1], 8u);
  ASSERT_EQ(H5Pget_nfilters(create_plist), 2);
  unsigned flags = 0;
  size_t shuffle_parameters = 0;
  EXPECT_EQ(H5Pget_filter2(create_plist, 0, &flags, &shuffle_parameters, nullptr, 0, nullptr, nullptr),
            H5Z_FILTER_SHUFFLE);
  size_t deflate_parameters = 1;
  unsigned level = 0;
  EXPECT_EQ(H5Pget_filter2(create_plist, 1, &flags, &deflate_parameters, &level, 0, nullptr, nullptr),
            H5Z_FILTER_DEFLATE);
  EXPECT_EQ(level, 4u);
  H5Pclose(create_plist);
  const hid_t space = H5Dget_space(kl.id());
  hsize_t dims[2], max_dims[2];
  H5Sget_simple_extent_dims(space, dims, max_dims);
  H5Sclose(space);
  EXPECT_EQ(max_dims[0], H5S_UNLIMITED);
  EXPECT_EQ(max_dims[1], 8u);

  const std::vector<double> doubles(8, 1.0);
  EXPECT_EQ(error_message([&] { kl.append(doubles.data(), 1); }),
            path + ": dataset '/kl' holds float32, cannot append float64 rows");
  EXPECT_EQ(error_message([&] { kl.append(std::vector<float>(12, 1.0f)); }),
            path + ": dataset '/kl': 12 values are not whole rows of shape [8]");
  kl.append(std::vector<float>(16, 2.0f));
  EXPECT_EQ(error_message([&] { kl.truncate(3); }), path + ": cannot truncate dataset '/kl' to 3 rows: it has 2");
  kl.append(std::vector<float>{});
  EXPECT_EQ(kl.rows(), 2u);
  file.write("fixed", std::vector<float>{1, 2}, {2});
  EXPECT_EQ(error_message([&] { file.open_appendable("fixed"); }),
            path + ": dataset '/fixed' of shape [2] is not appendable: axis 0 is not unlimited");
  EXPECT_EQ(error_message([&] { file.open_appendable("steps/kl"); }), path + ": dataset '/steps/kl' does not exist");
  EXPECT_EQ(error_message([&] {
              file.create_appendable<float>("bad", {3, 0});
            }),
            path + ": dataset '/bad': row shape [3, 0] has an empty dimension");
}

TEST(Hdf5, AppendableDatasetReopensForResume) {
  const std::string path = scratch_dir() + "/resume.h5";
  {
    File file = File::create(path, true);
    AppendableDataset tokens = file.create_appendable<int64_t>("samples/0/tokens", {2}, {3, 1, false});
    tokens.append(std::vector<int64_t>{0, 1, 2, 3, 4, 5, 6, 7, 8, 9});
    file.close();
  }
  {
    File file = File::open_read_write(path);
    AppendableDataset tokens = file.open_group("samples/0").open_appendable("tokens");
    EXPECT_EQ(tokens.path(), "/samples/0/tokens");
    EXPECT_EQ(tokens.element_type(), h5::ElementType::Int64);
    EXPECT_EQ(tokens.row_shape(), std::vector<hsize_t>{2});
    EXPECT_EQ(tokens.rows(), 5u);
    tokens.truncate(3);  // rows 3 and 4 belonged to a sample cut short
    tokens.append(std::vector<int64_t>{60, 70, 80, 90});
    file.start_swmr_write();  // a resumed run goes on in SWMR mode
    tokens.append(std::vector<int64_t>{100, 110});
    tokens.flush();
  }
  const File file = File::open_read(path);
  std::vector<hsize_t> shape;
  EXPECT_EQ(file.read<int64_t>("samples/0/tokens", &shape),
            (std::vector<int64_t>{0, 1, 2, 3, 4, 5, 60, 70, 80, 90, 100, 110}));
  EXPECT_EQ(shape, (std::vector<hsize_t>{6, 2}));
}

TEST(Hdf5, FailuresLeaveNoHdf5ObjectsOpen) {
  const std::string path = scratch_dir() + "/failures.h5";
  {
    File file = File::create(path, true);
    file.write("tokens", std::vector<int64_t>{1, 2}, {2});
    file.create_appendable<float>("kl", {2}).append(std::vector<float>{1, 2});
    file.set_attribute("name", "kivi");
    error_message([&] { file.read<float>("tokens"); });
    error_message([&] { file.read<float>("missing"); });
    error_message([&] { file.attribute<double>("name"); });
    error_message([&] { file.create_group("tokens/x"); });
    error_message([&] { file.open_appendable("tokens"); });
  }
  {
    const File file = File::open_read(path);
    AppendableDataset kl = file.open_appendable("kl");
    const std::string read_only = error_message([&] { kl.append(std::vector<float>{3, 4}); });
    EXPECT_TRUE(contains(read_only, path + ": cannot extend dataset '/kl' to 2 rows (HDF5: ")) << read_only;
    EXPECT_EQ(kl.rows(), 1u);
  }
  // Files, groups, datasets and attributes: every identifier the layer opened has been closed.
  EXPECT_EQ(H5Fget_obj_count(H5F_OBJ_ALL, H5F_OBJ_ALL), 0);
}

// Writes one of everything the layer stores; h5py checks it all.
TEST(Hdf5, H5pyReadsWhatTheLayerWrites) {
  const std::string dir = scratch_dir();
  const std::string path = dir + "/layer.h5";
  {
    File file = File::create(path, true);
    file.set_attribute("schema_version", 1);
    file.set_attribute("tool", "kvdrift 0.1.0");
    file.set_attribute("bits", std::vector<double>{3.375, 2.5});
    file.write("f32", std::vector<float>{1.5f, -2.0f, 3.25f, 0.0f, 1e-7f, -1e30f}, {2, 3}, 4);
    file.write("f64", std::vector<double>{0.1, 0.2, 0.3, 0.4}, {4});
    file.write("i64", std::vector<int64_t>{-9007199254740993}, {});
    file.write("i32", std::vector<int32_t>{1, -2, 3, -4, 5, -6, 7, -8}, {2, 2, 2});
    file.write("u8", std::vector<uint8_t>{0, 1, 127, 128, 255}, {5}, 9);
    Group prompt = file.create_group("samples/0/prompt");
    prompt.set_attribute("length", 4);
    prompt.set_attribute("ids", std::vector<int64_t>{1, 403, 407, 261});
    prompt.write_strings("pieces", {"Once", " upon", " a", " tïme ✓"});
    prompt.write_string("text", "Once upon a time");
    AppendableDataset kl = file.create_appendable<float>("samples/0/kivi/teacher_forced/kl", {2});
    kl.set_attribute("unit", "nats");
    kl.append(std::vector<float>{0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 2.5f});
    file.close();
  }
  const std::string script = R"(
import sys
import h5py
import numpy as np

def check(condition, what):
    if not condition:
        print("mismatch:", what)
        sys.exit(1)

with h5py.File(sys.argv[1], "r") as f:
    check(f.attrs["schema_version"] == 1 and f.attrs["schema_version"].dtype == np.int64, "schema_version")
    check(f.attrs["tool"] == "kvdrift 0.1.0", "tool attribute")
    check(np.array_equal(f.attrs["bits"], [3.375, 2.5]) and f.attrs["bits"].dtype == np.float64, "bits")
    check(f["f32"].dtype == np.float32 and f["f32"].shape == (2, 3), "f32 type/shape")
    check(np.array_equal(f["f32"][()], np.array([[1.5, -2.0, 3.25], [0.0, 1e-7, -1e30]], dtype=np.float32)), "f32")
    check(f["f32"].compression == "gzip" and f["f32"].compression_opts == 4 and f["f32"].shuffle, "f32 filters")
    check(f["f64"].dtype == np.float64 and list(f["f64"][()]) == [0.1, 0.2, 0.3, 0.4], "f64")
    check(f["i64"].dtype == np.int64 and f["i64"].shape == () and f["i64"][()] == -9007199254740993, "i64")
    check(f["i32"].dtype == np.int32 and f["i32"].shape == (2, 2, 2), "i32 type/shape")
    check(np.array_equal(f["i32"][()].ravel(), [1, -2, 3, -4, 5, -6, 7, -8]), "i32")
    check(f["u8"].dtype == np.uint8 and list(f["u8"][()]) == [0, 1, 127, 128, 255], "u8")
    check(f["u8"].compression_opts == 9, "u8 gzip level")
    prompt = f["samples/0/prompt"]
    check(prompt.attrs["length"] == 4 and list(prompt.attrs["ids"]) == [1, 403, 407, 261], "prompt attributes")
    check(h5py.check_string_dtype(prompt["pieces"].dtype).encoding == "utf-8", "pieces encoding")
    check(list(prompt["pieces"].asstr()[()]) == ["Once", " upon", " a", " t\u00efme \u2713"], "pieces")
    check(prompt["text"].shape == () and prompt["text"].asstr()[()] == "Once upon a time", "text")
    kl = f["samples/0/kivi/teacher_forced/kl"]
    check(kl.dtype == np.float32 and kl.shape == (3, 2), "kl type/shape")
    check(kl.maxshape == (None, 2) and kl.chunks == (64, 2), "kl layout")
    check(np.array_equal(kl[()], [[0.0, 0.5], [1.0, 1.5], [2.0, 2.5]]) and kl.attrs["unit"] == "nats", "kl")
print("ok")
)";
  std::string output;
  EXPECT_EQ(run_python(dir, "check_layer_file", script, {path}, &output), 0) << output;
  EXPECT_EQ(output, "ok\n");
}

TEST(Hdf5, ReadsWhatH5pyWrites) {
  const std::string dir = scratch_dir();
  const std::string path = dir + "/from_h5py.h5";
  const std::string script = R"(
import sys
import h5py
import numpy as np

with h5py.File(sys.argv[1], "w") as f:
    f.attrs["count"] = np.int32(7)
    f.attrs["ratio"] = np.float32(0.5)
    f.attrs["name"] = "stories260K"
    f.attrs["fixed"] = np.bytes_("fixed width")
    f.attrs["list"] = np.array([1, 2, 3], dtype=np.int16)
    f["big_endian"] = np.array([1.25, -2.5], dtype=">f8")
    f["fixed_strings"] = np.array([b"ab", b"c", b""], dtype="S4")
    f["vlen_strings"] = np.array(["x", "y\u00e9"], dtype=h5py.string_dtype())
    f["int16"] = np.arange(3, dtype=np.int16)
    f["bool"] = np.array([True, False])
)";
  std::string output;
  ASSERT_EQ(run_python(dir, "write_file", script, {path}, &output), 0) << output;

  const File file = File::open_read(path);
  EXPECT_EQ(file.attribute<int64_t>("count"), 7);
  EXPECT_EQ(file.attribute<double>("ratio"), 0.5);
  EXPECT_EQ(file.attribute<std::string>("name"), "stories260K");
  EXPECT_EQ(file.attribute<std::string>("fixed"), "fixed width");
  EXPECT_EQ(file.attribute<std::vector<int64_t>>("list"), (std::vector<int64_t>{1, 2, 3}));
  EXPECT_EQ(file.read<double>("big_endian"), (std::vector<double>{1.25, -2.5}));
  EXPECT_EQ(file.read_strings("fixed_strings"), (std::vector<std::string>{"ab", "c", ""}));
  EXPECT_EQ(file.read_strings("vlen_strings"), (std::vector<std::string>{"x", "yé"}));
  EXPECT_EQ(error_message([&] { file.read<int32_t>("int16"); }),
            path + ": dataset '/int16' holds int16, expected int32");
  EXPECT_EQ(error_message([&] { file.read<uint8_t>("bool"); }), path + ": dataset '/bool' holds enum, expected uint8");
}

const char* const kSwmrReaderScript = R"(
import sys
import h5py
import numpy as np

path, expected_rows = sys.argv[1], int(sys.argv[2])
with h5py.File(path, "r", libver="latest", swmr=True) as f:
    kl, tokens = f["steps/kl"], f["steps/tokens"]
    if kl.shape != (expected_rows, 3) or tokens.shape != (expected_rows,):
        print("shapes", kl.shape, tokens.shape)
        sys.exit(1)
    expected = np.arange(expected_rows * 3, dtype=np.float32).reshape(expected_rows, 3) / 4
    if not np.array_equal(kl[()], expected) or list(tokens[()]) != [100 + i for i in range(expected_rows)]:
        print("values", kl[()], tokens[()])
        sys.exit(1)
    if f.attrs["status"] != "running":
        sys.exit(1)
print("ok", expected_rows)
)";

// Appends rows [first, first + count) of the SWMR test's kl and tokens datasets.
void append_steps(AppendableDataset& kl, AppendableDataset& tokens, int64_t first, int64_t count) {
  for (int64_t row = first; row < first + count; ++row) {
    const float first_value = static_cast<float>(row * 3);
    const std::vector<float> values = {first_value / 4, (first_value + 1) / 4, (first_value + 2) / 4};
    kl.append(values);
    tokens.append(std::vector<int64_t>{100 + row});
  }
}

TEST(Hdf5, SwmrReaderSeesFlushedRowsWhileTheWriterRuns) {
  const std::string dir = scratch_dir();
  const std::string path = dir + "/live.h5";
  File file = File::create(path, true);
  file.set_attribute("status", "running");
  AppendableDataset kl = file.create_appendable<float>("steps/kl", {3});
  AppendableDataset tokens = file.create_appendable<int64_t>("steps/tokens", {}, {16, 4, true});
  file.start_swmr_write();

  std::string output;
  append_steps(kl, tokens, 0, 5);
  kl.flush();
  tokens.flush();
  EXPECT_EQ(run_python(dir, "swmr_reader", kSwmrReaderScript, {path, "5"}, &output), 0) << output;
  EXPECT_EQ(output, "ok 5\n");

  append_steps(kl, tokens, 5, 70);  // past the first 64-row chunk
  file.flush();
  EXPECT_EQ(run_python(dir, "swmr_reader", kSwmrReaderScript, {path, "75"}, &output), 0) << output;
  EXPECT_EQ(output, "ok 75\n");
}

TEST(Hdf5, RecoversTheFileOfAWriterKilledInSwmrMode) {
  const std::string dir = scratch_dir();
  const std::string path = dir + "/killed.h5";
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    // The writer: flushes 5 rows, writes 2 more without flushing, and dies without closing anything.
    try {
      File file = File::create(path, true);
      AppendableDataset kl = file.create_appendable<float>("kl", {2});
      file.start_swmr_write();
      kl.append(std::vector<float>{0, 1, 2, 3, 4, 5, 6, 7, 8, 9});
      kl.flush();
      kl.append(std::vector<float>{10, 11, 12, 13});
      ::_exit(0);
    } catch (...) {
      ::_exit(1);
    }
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);

  const std::string refused = error_message([&] { File::open_read(path); });
  EXPECT_TRUE(contains(refused, "cannot open HDF5 file " + path + " for reading (HDF5: ")) << refused;
  EXPECT_TRUE(contains(refused, "already open for write")) << refused;
  const std::vector<float> flushed = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9};
  EXPECT_EQ(File::open_read(path, true).read<float>("kl"), flushed);
  {
    File file = File::recover_read_write(path);
    AppendableDataset kl = file.open_appendable("kl");
    ASSERT_EQ(kl.rows(), 5u);
    kl.append(std::vector<float>{20, 21});
    file.close();
  }
  std::vector<float> expected = flushed;
  expected.insert(expected.end(), {20, 21});
  EXPECT_EQ(File::open_read(path).read<float>("kl"), expected);
  std::string output;
  EXPECT_EQ(run_python(dir, "read_recovered",
                       "import sys, h5py\n"
                       "with h5py.File(sys.argv[1], 'r') as f:\n"
                       "    print(f['kl'][()].ravel().tolist())\n",
                       {path}, &output),
            0)
      << output;
  EXPECT_EQ(output, "[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 20.0, 21.0]\n");
}

}  // namespace
}  // namespace kvdrift
