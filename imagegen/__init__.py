"""imagegen: a text-to-image HTTP function for Google Cloud Functions.

`main.generate_image` is the functions-framework target; `imagegen.http.handle` does the work.
"""
