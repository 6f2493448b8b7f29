# tokenman: one stdlib-only file on a slim CPython image.
#   docker build -t tokenman .
#   docker run -p 7677:7677 -v tokenman-data:/data tokenman
FROM python:3.12-slim

RUN useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin tokenman \
    && mkdir -p /data /app && chown tokenman:tokenman /data
COPY tokenman.py /app/tokenman.py
# Bytecode compiled once at build time: the non-root user cannot write /app at run time.
RUN python -m compileall -q /app

# Inside a container the proxy must listen on every interface to be reachable at all.
ENV TOKENMAN_SERVER_DATA_DIR=/data \
    TOKENMAN_SERVER_BIND_ADDRESS=0.0.0.0 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

USER tokenman
WORKDIR /data
VOLUME ["/data"]
EXPOSE 7677 7678

HEALTHCHECK --interval=30s --timeout=5s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import os,sys,urllib.request; p=os.environ.get('TOKENMAN_SERVER_PROXY_PORT','7677'); sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:%s/health' % p, timeout=4).status == 200 else 1)"]

ENTRYPOINT ["python", "/app/tokenman.py"]
CMD ["start", "--foreground"]
