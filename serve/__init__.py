"""Ray Serve application: the unCLIP cascade as a graph of deployments behind OpenAI's Images API.

    app.py               which bundles, which deployments, bound together (serve.app:build_app)
    ingress.py           the FastAPI ingress: routes, chaining the stages, responses
    image_requests.py    parsing and checking the three Images API requests
    http_errors.py       errors in OpenAI's shape, and what each failure maps to
    api_keys.py          optional Bearer keys
    encoders.py          TextEncoder, ImageEncoder (CLIP)
    diffusion_stages.py  Prior, Decoder, Upsampler (one deployment per upsampler bundle)
    model_stage.py       what model deployments share: bundle, device, batching settings
    lockstep.py          one forward per diffusion step for a batch of independent requests
    messages.py          what the stages hand each other; the request's noise source
    image_store.py       PNGs behind `response_format: url`
    web.py               the page at /
    config.yaml          CPU settings; config.gpu.yaml: placement on 4 GPUs

Ray stays here: the stages call the plain functions of dalle2.cascade.
"""
