import pytest

from kdcli.errors import KdError
from kdcli.models import build_model, count_params
from kdcli.registry import MODELS, Registry, import_user_modules


def test_register_build_list_and_errors():
    reg = Registry("widget")

    @reg.register("square")
    def square(x, *, times: int = 2):
        """Multiply by `times`."""
        return x * times

    assert reg.names() == ["square"]
    assert reg.build("square", 3, times=4) == 12
    assert reg.params("square") == {"times": 2}
    assert reg.summary("square") == "Multiply by `times`."
    with pytest.raises(KdError, match=r"Unknown widget 'sqare'\. Did you mean 'square'\? Available: square"):
        reg.get("sqare")
    with pytest.raises(KdError, match="widget 'square' has no parameter tims. Its parameters: times"):
        reg.build("square", 3, tims=4)
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("square")(lambda x: x)


def test_user_model_from_a_python_file(tmp_path):
    f = tmp_path / "my_models.py"
    f.write_text(
        "import torch.nn as nn\n"
        "from kdcli.registry import MODELS\n"
        "@MODELS.register('tiny_linear_test')\n"
        "def tiny(input_shape, num_classes, *, bias: bool = True):\n"
        "    size = input_shape[0] * input_shape[1] * input_shape[2]\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(size, num_classes, bias=bias))\n"
    )
    import_user_modules([str(f)])
    assert "tiny_linear_test" in MODELS.names()
    model = build_model("tiny_linear_test", (1, 4, 4), 3, {"bias": False})
    assert count_params(model) == 16 * 3


def test_broken_user_module_is_named(tmp_path):
    f = tmp_path / "broken.py"
    f.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(KdError, match=r"could not import '.*broken.py': RuntimeError: boom"):
        import_user_modules([str(f)])
    with pytest.raises(KdError, match="could not import 'no_such_module_xyz'"):
        import_user_modules(["no_such_module_xyz"])
