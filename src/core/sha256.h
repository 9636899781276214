#pragma once
// SHA-256 (FIPS 180-4), for model identity in run logs.
#include <cstdint>
#include <string>

namespace kvdrift {

std::string sha256_hex(const std::string& bytes);
// Streams the file; throws Error naming it when it cannot be read.
std::string sha256_file(const std::string& path);

}  // namespace kvdrift
