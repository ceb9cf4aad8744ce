"""The HTTP shell: the only package that imports aiohttp.web."""
