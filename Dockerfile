# Multi-stage build: compile with the Rust toolchain, run on a slim Debian as a non-root user.
#   docker build -t mail2ticket .
#   docker run -v /srv/mail2ticket:/etc/mail2ticket:ro -e CONTOSO_SECRET=... mail2ticket
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY migrations ./migrations
RUN cargo build --release --locked --bin mail2ticket

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home /nonexistent --shell /usr/sbin/nologin mail2ticket
COPY --from=build /src/target/release/mail2ticket /usr/local/bin/mail2ticket
COPY config/mail2ticket.example.toml /usr/share/mail2ticket/mail2ticket.example.toml
USER 10001:10001
ENV MAIL2TICKET_LOG_FORMAT=json \
    MAIL2TICKET_CONFIG=/etc/mail2ticket/mail2ticket.toml
VOLUME ["/etc/mail2ticket"]
ENTRYPOINT ["/usr/local/bin/mail2ticket"]
CMD ["run"]
