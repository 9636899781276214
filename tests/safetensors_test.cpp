#include "io/safetensors.h"

#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/error.h"
#include "support.h"

namespace kvdrift {
namespace {

namespace fs = std::filesystem;
using test::read_file;
using test::scratch_dir;
using test::write_file;

// A safetensors file as bytes: 8-byte little-endian header length, the header text, the byte buffer.
std::string assemble_safetensors(const std::string& header, const std::string& data = "") {
  std::string bytes;
  for (int i = 0; i < 8; ++i) bytes.push_back(static_cast<char>((header.size() >> (8 * i)) & 0xff));
  return bytes + header + data;
}

uint64_t read_u64_le(const std::string& bytes) {
  uint64_t value = 0;
  for (int i = 0; i < 8; ++i) value |= static_cast<uint64_t>(static_cast<unsigned char>(bytes[i])) << (8 * i);
  return value;
}

template <typename T>
std::string bytes_of(const std::vector<T>& values) {
  return std::string(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(T));
}

std::string bytes_of(const SafetensorsEntry& entry) {
  return std::string(reinterpret_cast<const char*>(entry.data), entry.nbytes);
}

std::vector<std::string> files_in(const std::string& dir) {
  std::vector<std::string> names;
  for (const auto& item : fs::directory_iterator(dir)) names.push_back(item.path().filename().string());
  return names;
}

// Expects the constructor to throw kvdrift::Error whose message names `path` and contains `keyword`.
void expect_read_error(const std::string& path, const std::string& keyword) {
  const std::string message = test::error_message([&] { SafetensorsFile file(path); });
  EXPECT_NE(message.find(path), std::string::npos) << message;
  EXPECT_NE(message.find(keyword), std::string::npos) << message;
}

std::string write_malformed(const std::string& header, const std::string& data = "") {
  const std::string path = scratch_dir() + "/model.safetensors";
  write_file(path, assemble_safetensors(header, data));
  return path;
}

struct RoundTripFixture {
  std::vector<float> weight = {1.0f, -2.5f, 3.25f, 0.0f, 1e-7f, -1e30f};   // [2, 3]
  std::vector<uint16_t> half = {0x3c00, 0xc000, 0x7bff, 0x0001};          // F16 [4]: 1, -2, max, min subnormal
  std::vector<uint16_t> brain = {0x3f80, 0xbf80, 0x4049, 0x7f80};         // BF16 [2, 2]: 1, -1, ~3.14, inf
  // Given out of name order on purpose: the file keeps this order, entries() sorts by name.
  std::vector<SafetensorsTensorView> views() const {
    return {{"z.weight", StorageDtype::F32, {2, 3}, weight.data(), weight.size() * 4},
            {"a.half", StorageDtype::F16, {4}, half.data(), half.size() * 2},
            {"m.brain", StorageDtype::BF16, {2, 2}, brain.data(), brain.size() * 2}};
  }
  std::map<std::string, std::string> metadata = {{"format", "pt"}, {"source", "kvdrift test"}};
};

TEST(Safetensors, DtypeNamesAndSizes) {
  EXPECT_STREQ(storage_dtype_name(StorageDtype::F32), "F32");
  EXPECT_STREQ(storage_dtype_name(StorageDtype::F16), "F16");
  EXPECT_STREQ(storage_dtype_name(StorageDtype::BF16), "BF16");
  EXPECT_EQ(storage_dtype_size(StorageDtype::F32), 4u);
  EXPECT_EQ(storage_dtype_size(StorageDtype::F16), 2u);
  EXPECT_EQ(storage_dtype_size(StorageDtype::BF16), 2u);
}

TEST(Safetensors, RoundTripKeepsBytesShapesAndMetadata) {
  const RoundTripFixture fixture;
  const std::string path = scratch_dir() + "/model.safetensors";
  write_safetensors(path, fixture.views(), fixture.metadata);

  const SafetensorsFile file(path);
  EXPECT_EQ(file.path(), path);
  ASSERT_EQ(file.entries().size(), 3u);
  EXPECT_EQ(file.entries()[0].name, "a.half");
  EXPECT_EQ(file.entries()[1].name, "m.brain");
  EXPECT_EQ(file.entries()[2].name, "z.weight");
  EXPECT_EQ(file.metadata(), fixture.metadata);

  const SafetensorsEntry* weight = file.find("z.weight");
  ASSERT_NE(weight, nullptr);
  EXPECT_EQ(weight->dtype, StorageDtype::F32);
  EXPECT_EQ(weight->shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(weight->nbytes, 24u);
  EXPECT_EQ(bytes_of(*weight), bytes_of(fixture.weight));
  float second = 0;
  std::memcpy(&second, weight->data + 4, 4);
  EXPECT_EQ(second, -2.5f);

  const SafetensorsEntry* half = file.find("a.half");
  ASSERT_NE(half, nullptr);
  EXPECT_EQ(half->dtype, StorageDtype::F16);
  EXPECT_EQ(half->shape, (std::vector<int64_t>{4}));
  EXPECT_EQ(bytes_of(*half), bytes_of(fixture.half));

  const SafetensorsEntry* brain = file.find("m.brain");
  ASSERT_NE(brain, nullptr);
  EXPECT_EQ(brain->dtype, StorageDtype::BF16);
  EXPECT_EQ(brain->shape, (std::vector<int64_t>{2, 2}));
  EXPECT_EQ(bytes_of(*brain), bytes_of(fixture.brain));

  EXPECT_EQ(file.find("missing"), nullptr);
  EXPECT_EQ(file.find("__metadata__"), nullptr);
}

TEST(Safetensors, WrittenFileMatchesTheFormat) {
  const RoundTripFixture fixture;
  const std::string path = scratch_dir() + "/model.safetensors";
  write_safetensors(path, fixture.views(), fixture.metadata);

  const std::string bytes = read_file(path);
  ASSERT_GE(bytes.size(), 8u);
  const uint64_t header_size = read_u64_le(bytes);
  EXPECT_EQ(header_size % 8, 0u);
  const uint64_t data_size = 24 + 8 + 8;
  ASSERT_EQ(bytes.size(), 8 + header_size + data_size);

  const std::string header_text = bytes.substr(8, header_size);
  const size_t json_end = header_text.find_last_not_of(' ') + 1;
  EXPECT_LT(header_size - json_end, 8u) << "padding is at most 7 spaces";
  const auto header = nlohmann::ordered_json::parse(header_text);
  ASSERT_TRUE(header.is_object());

  // Tensors appear in the order given, with contiguous offsets in that order.
  std::vector<std::string> keys;
  for (const auto& item : header.items()) keys.push_back(item.key());
  EXPECT_EQ(keys, (std::vector<std::string>{"__metadata__", "z.weight", "a.half", "m.brain"}));
  EXPECT_EQ(header["__metadata__"], (nlohmann::ordered_json{{"format", "pt"}, {"source", "kvdrift test"}}));
  EXPECT_EQ(header["z.weight"]["dtype"], "F32");
  EXPECT_EQ(header["z.weight"]["shape"], (nlohmann::ordered_json{2, 3}));
  EXPECT_EQ(header["z.weight"]["data_offsets"], (nlohmann::ordered_json{0, 24}));
  EXPECT_EQ(header["a.half"]["dtype"], "F16");
  EXPECT_EQ(header["a.half"]["shape"], (nlohmann::ordered_json{4}));
  EXPECT_EQ(header["a.half"]["data_offsets"], (nlohmann::ordered_json{24, 32}));
  EXPECT_EQ(header["m.brain"]["dtype"], "BF16");
  EXPECT_EQ(header["m.brain"]["shape"], (nlohmann::ordered_json{2, 2}));
  EXPECT_EQ(header["m.brain"]["data_offsets"], (nlohmann::ordered_json{32, 40}));

  const std::string data = bytes.substr(8 + header_size);
  EXPECT_EQ(data, bytes_of(fixture.weight) + bytes_of(fixture.half) + bytes_of(fixture.brain));
  EXPECT_EQ(files_in(fs::path(path).parent_path().string()), std::vector<std::string>{"model.safetensors"})
      << "no temporary file left beside the output";
}

TEST(Safetensors, NoMetadataMeansNoMetadataKey) {
  const std::vector<float> values = {4.0f};
  const std::string path = scratch_dir() + "/plain.safetensors";
  write_safetensors(path, {{"x", StorageDtype::F32, {1}, values.data(), 4}});

  const std::string bytes = read_file(path);
  const auto header = nlohmann::json::parse(bytes.substr(8, read_u64_le(bytes)));
  EXPECT_FALSE(header.contains("__metadata__"));
  EXPECT_TRUE(SafetensorsFile(path).metadata().empty());
}

TEST(Safetensors, OverwritesAnExistingFile) {
  const std::string path = scratch_dir() + "/model.safetensors";
  write_file(path, "old contents");
  const std::vector<float> values = {7.0f, 8.0f};
  write_safetensors(path, {{"x", StorageDtype::F32, {2}, values.data(), 8}});
  const SafetensorsFile file(path);
  ASSERT_NE(file.find("x"), nullptr);
  EXPECT_EQ(bytes_of(*file.find("x")), bytes_of(values));
}

TEST(Safetensors, ZeroElementTensor) {
  const std::vector<float> before = {1.0f, 2.0f};
  const std::vector<float> after = {3.0f};
  const std::string path = scratch_dir() + "/model.safetensors";
  write_safetensors(path, {{"before", StorageDtype::F32, {2}, before.data(), 8},
                           {"empty", StorageDtype::BF16, {0, 4}, nullptr, 0},
                           {"after", StorageDtype::F32, {1}, after.data(), 4}});

  const SafetensorsFile file(path);
  const SafetensorsEntry* empty = file.find("empty");
  ASSERT_NE(empty, nullptr);
  EXPECT_EQ(empty->dtype, StorageDtype::BF16);
  EXPECT_EQ(empty->shape, (std::vector<int64_t>{0, 4}));
  EXPECT_EQ(empty->nbytes, 0u);
  ASSERT_NE(file.find("after"), nullptr);
  EXPECT_EQ(bytes_of(*file.find("after")), bytes_of(after));

  const std::string bytes = read_file(path);
  const auto header = nlohmann::json::parse(bytes.substr(8, read_u64_le(bytes)));
  EXPECT_EQ(header["empty"]["data_offsets"], (nlohmann::json{8, 8}));
  EXPECT_EQ(header["after"]["data_offsets"], (nlohmann::json{8, 12}));
}

TEST(Safetensors, ZeroSizeTensorInsideAnotherIsNoOverlap) {
  const std::string path = write_malformed(
      R"({"big":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"empty":{"dtype":"F16","shape":[0],"data_offsets":[4,4]}})",
      std::string(8, '\x01'));
  const SafetensorsFile file(path);
  ASSERT_EQ(file.entries().size(), 2u);
  EXPECT_EQ(file.find("empty")->nbytes, 0u);
}

TEST(Safetensors, ScalarAndEmptyHeader) {
  const std::string dir = scratch_dir();
  const std::string scalar_path = dir + "/scalar.safetensors";
  write_file(scalar_path, assemble_safetensors(R"({"s":{"dtype":"F32","shape":[],"data_offsets":[0,4]}})", "abcd"));
  const SafetensorsFile scalar(scalar_path);
  ASSERT_NE(scalar.find("s"), nullptr);
  EXPECT_TRUE(scalar.find("s")->shape.empty());
  EXPECT_EQ(bytes_of(*scalar.find("s")), "abcd");

  const std::string empty_path = dir + "/empty.safetensors";
  write_file(empty_path, assemble_safetensors("{}"));
  EXPECT_TRUE(SafetensorsFile(empty_path).entries().empty());
}

TEST(Safetensors, MoveKeepsTheMappingAlive) {
  const std::vector<float> values = {1.5f, 2.5f};
  const std::string dir = scratch_dir();
  const std::string path = dir + "/model.safetensors";
  write_safetensors(path, {{"x", StorageDtype::F32, {2}, values.data(), 8}}, {{"k", "v"}});

  SafetensorsFile original(path);
  const std::byte* data = original.find("x")->data;
  SafetensorsFile moved(std::move(original));
  EXPECT_TRUE(original.entries().empty());  // the moved-from file no longer owns the mapping
  ASSERT_NE(moved.find("x"), nullptr);
  EXPECT_EQ(moved.find("x")->data, data);
  EXPECT_EQ(bytes_of(*moved.find("x")), bytes_of(values));

  const std::string other_path = dir + "/other.safetensors";
  write_safetensors(other_path, {});
  SafetensorsFile assigned(other_path);
  assigned = std::move(moved);
  EXPECT_EQ(assigned.path(), path);
  EXPECT_EQ(assigned.metadata().at("k"), "v");
  EXPECT_EQ(bytes_of(*assigned.find("x")), bytes_of(values));
}

// Reader errors: each names the file and the problem.

TEST(SafetensorsErrors, MissingFile) {
  const std::string path = scratch_dir() + "/does-not-exist.safetensors";
  expect_read_error(path, "cannot open");
  expect_read_error(path, "No such file");
}

TEST(SafetensorsErrors, Directory) { expect_read_error(scratch_dir(), "not a regular file"); }

TEST(SafetensorsErrors, ShorterThanEightBytes) {
  const std::string path = scratch_dir() + "/short.safetensors";
  write_file(path, "abc");
  expect_read_error(path, "shorter than the 8-byte header length");
  write_file(path, "");
  expect_read_error(path, "shorter");
}

TEST(SafetensorsErrors, HeaderLengthPastEndOfFile) {
  const std::string path = scratch_dir() + "/model.safetensors";
  std::string bytes = assemble_safetensors("{}");
  bytes[0] = static_cast<char>(200);  // claims a 200-byte header in a 10-byte file
  write_file(path, bytes);
  expect_read_error(path, "header length 200 runs past the end of the file");
}

TEST(SafetensorsErrors, HeaderLengthOverLimit) {
  const std::string path = scratch_dir() + "/model.safetensors";
  const uint64_t header_size = 100'000'001;
  std::string prefix;
  for (int i = 0; i < 8; ++i) prefix.push_back(static_cast<char>((header_size >> (8 * i)) & 0xff));
  write_file(path, prefix);
  fs::resize_file(path, 8 + header_size);  // sparse: the file is long enough, so only the limit trips
  expect_read_error(path, "header length 100000001 exceeds the 100000000-byte limit");
}

TEST(SafetensorsErrors, HeaderNotJson) {
  expect_read_error(write_malformed(R"({"x": {"dtype": "F32", )"), "not valid JSON");
  expect_read_error(write_malformed("not json at all"), "not valid JSON");
}

TEST(SafetensorsErrors, HeaderNotAnObject) { expect_read_error(write_malformed("[1, 2, 3]"), "not a JSON object"); }

TEST(SafetensorsErrors, EntryMissingFields) {
  expect_read_error(write_malformed(R"({"x":{"shape":[1],"data_offsets":[0,4]}})", "abcd"), "\"dtype\"");
  expect_read_error(write_malformed(R"({"x":{"dtype":"F32","data_offsets":[0,4]}})", "abcd"), "\"shape\"");
  expect_read_error(write_malformed(R"({"x":{"dtype":"F32","shape":[1]}})", "abcd"), "data_offsets");
  expect_read_error(write_malformed(R"({"x":"F32"})"), "'x' header entry is not a JSON object");
}

TEST(SafetensorsErrors, NegativeOrFractionalShape) {
  expect_read_error(write_malformed(R"({"x":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", "abcd"),
                    "non-negative integers");
  expect_read_error(write_malformed(R"({"x":{"dtype":"F32","shape":[1.5],"data_offsets":[0,4]}})", "abcd"),
                    "non-negative integers");
}

TEST(SafetensorsErrors, BadDataOffsets) {
  expect_read_error(write_malformed(R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}})", "abcd"),
                    "begin <= end");
  expect_read_error(write_malformed(R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[-4,0]}})", "abcd"),
                    "data_offsets");
  expect_read_error(write_malformed(R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[0]}})", "abcd"),
                    "data_offsets");
}

TEST(SafetensorsErrors, UnsupportedDtype) {
  const std::string path =
      write_malformed(R"({"ids":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}})", std::string(8, '\0'));
  expect_read_error(path, "tensor 'ids' has unsupported dtype I64");
  expect_read_error(write_malformed(R"({"d":{"dtype":"F64","shape":[1],"data_offsets":[0,8]}})", std::string(8, '\0')),
                    "unsupported dtype F64");
}

TEST(SafetensorsErrors, ShapeSizeMismatch) {
  const std::string path = write_malformed(R"({"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,20]}})",
                                           std::string(24, '\0'));
  expect_read_error(path, "tensor 'w' size mismatch");
  expect_read_error(path, "needs 24 bytes");
}

TEST(SafetensorsErrors, ShapeByteCountOverflow) {
  expect_read_error(
      write_malformed(R"({"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]}})"),
      "size mismatch");
}

TEST(SafetensorsErrors, OffsetPastEndOfBuffer) {
  const std::string path =
      write_malformed(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", std::string(8, '\0'));
  expect_read_error(path, "tensor 'w' data_offsets [4, 12] run past the end of the 8-byte data buffer");
}

TEST(SafetensorsErrors, OverlappingOffsets) {
  const std::string path = write_malformed(
      R"({"x":{"dtype":"F32","shape":[20],"data_offsets":[0,80]},"y":{"dtype":"F32","shape":[16],"data_offsets":[64,128]}})",
      std::string(128, '\0'));
  expect_read_error(path, "tensor 'x' data_offsets [0, 80] overlap tensor 'y' [64, 128]");
}

TEST(SafetensorsErrors, OverlapFoundBetweenNonAdjacentNames) {
  // Sorted by offset, "c" [8,16] sits inside "a" [0,24] even though "b" comes between them by name.
  const std::string path = write_malformed(
      R"({"a":{"dtype":"F32","shape":[6],"data_offsets":[0,24]},"b":{"dtype":"F32","shape":[2],"data_offsets":[24,32]},)"
      R"("c":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})",
      std::string(32, '\0'));
  expect_read_error(path, "tensor 'a' data_offsets [0, 24] overlap tensor 'c' [8, 16]");
}

TEST(SafetensorsErrors, MetadataValueNotString) {
  expect_read_error(write_malformed(R"({"__metadata__":{"format":"pt","step":3}})"),
                    "__metadata__ value for key 'step' is not a string");
  expect_read_error(write_malformed(R"({"__metadata__":["pt"]})"), "__metadata__ must be a JSON object");
}

// Writer errors: each names the path and the tensor, and leaves no file behind.

void expect_write_error(const std::string& path, const std::vector<SafetensorsTensorView>& tensors,
                        const std::string& keyword) {
  const std::string message = test::error_message([&] { write_safetensors(path, tensors); });
  EXPECT_NE(message.find(path), std::string::npos) << message;
  EXPECT_NE(message.find(keyword), std::string::npos) << message;
}

TEST(SafetensorsWriteErrors, NbytesMismatch) {
  const std::string dir = scratch_dir();
  const std::vector<float> values = {1.0f, 2.0f, 3.0f};
  expect_write_error(dir + "/out.safetensors", {{"w", StorageDtype::F32, {2, 2}, values.data(), 12}},
                     "tensor 'w' has 12 bytes but shape [2, 2] of F32 needs 16");
  expect_write_error(dir + "/out.safetensors", {{"w", StorageDtype::F32, {-3}, values.data(), 12}}, "tensor 'w'");
  EXPECT_TRUE(files_in(dir).empty());
}

TEST(SafetensorsWriteErrors, DuplicateNames) {
  const std::string dir = scratch_dir();
  const std::vector<float> values = {1.0f};
  expect_write_error(dir + "/out.safetensors",
                     {{"w", StorageDtype::F32, {1}, values.data(), 4}, {"w", StorageDtype::F32, {1}, values.data(), 4}},
                     "duplicate tensor name 'w'");
  expect_write_error(dir + "/out.safetensors", {{"__metadata__", StorageDtype::F32, {1}, values.data(), 4}},
                     "reserved");
  EXPECT_TRUE(files_in(dir).empty());
}

TEST(SafetensorsWriteErrors, CannotWrite) {
  const std::string dir = scratch_dir();
  const std::vector<float> values = {1.0f};
  const std::string path = dir + "/no-such-dir/out.safetensors";
  expect_write_error(path, {{"w", StorageDtype::F32, {1}, values.data(), 4}}, "cannot write");
  EXPECT_TRUE(files_in(dir).empty());
}

TEST(SafetensorsWriteErrors, RenameOntoDirectoryLeavesNoTemporary) {
  const std::string dir = scratch_dir();
  const std::string path = dir + "/taken";
  fs::create_directories(path + "/child");  // rename() cannot replace a non-empty directory
  const std::vector<float> values = {1.0f};
  expect_write_error(path, {{"w", StorageDtype::F32, {1}, values.data(), 4}}, "rename");
  EXPECT_EQ(files_in(dir), std::vector<std::string>{"taken"});
}

}  // namespace
}  // namespace kvdrift
