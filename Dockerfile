# The mows daemon image. Pinned base; runs as an unprivileged user (uid 10001).
FROM python:3.11.11-slim-bookworm
RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin mows
WORKDIR /opt/mows
COPY pyproject.toml README.md ./
COPY src ./src
# The daemon needs no torch: clients (engines) bring their own.
RUN pip install --no-cache-dir . && rm -rf /root/.cache
USER 10001:10001
ENV MOWS_SOCKET=/run/mows/mows.sock
EXPOSE 7470 9470
ENTRYPOINT ["mows"]
CMD ["serve", "--config", "/etc/mows/mows.toml"]
