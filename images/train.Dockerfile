# r1zero training image: the runtime image plus what multi-node jobs need. PyTorchJob/TrainJob pods
# run `torchrun` (the operator injects PET_*); MPIJob workers run sshd as the non-root user and the
# launcher runs `deepspeed --hostfile` (pdsh over ssh). g++ is for DeepSpeed's JIT-built CPU ops.
# Built by `make images` (r1zero/images.py) FROM the runtime image of the same tag; the CUDA target
# passes a runtime image built on a CUDA base (see runtime.Dockerfile) and adds the RDMA libraries
# with EXTRA_PACKAGES="libibverbs1 librdmacm1".
ARG RUNTIME_IMAGE=r1zero-runtime:local

FROM ${RUNTIME_IMAGE}
ARG UID=10001
# Versions of Debian bookworm (12) at the time of writing; a point release moves them (bump here).
ARG OPENSSH_VERSION=1:9.2p1-2+deb12u10
ARG PDSH_VERSION=2.34-0.2
ARG GXX_VERSION=4:12.2.0-3
ARG EXTRA_PACKAGES=""
USER 0
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        openssh-server="${OPENSSH_VERSION}" openssh-client="${OPENSSH_VERSION}" \
        pdsh="${PDSH_VERSION}" g++="${GXX_VERSION}" ${EXTRA_PACKAGES} \
    && rm -rf /var/lib/apt/lists/* /etc/ssh/ssh_host_*_key* \
    && mkdir -p /run/sshd
# sshd as the pod's non-root uid (mpi-operator's non-root layout): port 2222, host key = the
# mounted job key, pid file on the writable /tmp; the client side matches (port, no known_hosts,
# and the job env the launcher's pods carry is forwarded to the workers' ranks).
COPY --chown=${UID}:${UID} images/sshd_config /home/r1zero/.sshd_config
COPY images/ssh_config /etc/ssh/ssh_config.d/r1zero.conf
ENV PDSH_RCMD_TYPE=ssh
USER ${UID}
WORKDIR /home/r1zero
ENTRYPOINT []
CMD ["torchrun", "--help"]
