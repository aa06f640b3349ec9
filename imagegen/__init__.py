"""imagegen: a text-to-image HTTP function for Google Cloud Functions.

`main.generate_image` is the functions-framework target; `imagegen.app` builds the handler
(`imagegen.http`) and the doors it serves (`imagegen.doors`) over the generation service
(`imagegen.service`). docs/project-layout.md maps the rest.
"""
