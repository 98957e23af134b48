"""The browser playground's static files (`static/`), served by `imagegate.api.playground`."""
