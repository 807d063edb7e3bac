"""mkdocs-gen-files: write the reference pages from the code's own declarations at build time
(serving_mfu.tools.docs_pages)."""

import mkdocs_gen_files

from serving_mfu.tools.docs_pages import PAGES

for name, make in PAGES.items():
    with mkdocs_gen_files.open(name, "w") as fh:
        fh.write(make())
