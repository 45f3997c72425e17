"""Ships the repository's gin/ directory inside the package (as etjax/gin/), the way
t5x ships its configs, so that a non-editable install resolves `include
'gin/meshes/dp.gin'` from any directory (etjax.main.gin_search_roots). Everything else
is declared in setup.cfg; an editable install reads gin/ from the checkout."""

import glob
import os

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithGin(build_py):
  """build_py that also copies gin/**/*.gin to <build_lib>/etjax/gin/."""

  def run(self):
    super().run()
    if getattr(self, "editable_mode", False):
      return
    for source in sorted(glob.glob(os.path.join("gin", "**", "*.gin"), recursive=True)):
      target = os.path.join(self.build_lib, "etjax", source)
      self.mkpath(os.path.dirname(target))
      self.copy_file(source, target)


setup(cmdclass={"build_py": BuildPyWithGin})
