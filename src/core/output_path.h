#pragma once
// The rule every command that writes a file follows before it starts: the output is absent or a regular
// file, it is not one of the command's inputs, and an existing one is replaced only when asked.
#include <string>
#include <vector>

namespace kvdrift {

// Throws Error naming `option` and the path: an empty path, a symbolic link to nothing (kvdrift never
// writes through a link it would have to create the target of), an output that exists but is not a
// regular file (a device, a FIFO, a folder), one that is the same file as an input (the same device and inode,
// links followed; an input folder, such as a model directory, stands for every file under it), and an
// existing one without `overwrite`.
void check_output_path(const std::string& option, const std::string& output, const std::vector<std::string>& inputs,
                       bool overwrite);
// The same but for the rule on existing files, for an output that is appended to (a run log resumes).
void check_output_kind(const std::string& option, const std::string& output, const std::vector<std::string>& inputs);

}  // namespace kvdrift
