#!/bin/sh
# A shell provisioner script: amidala runs it inside the image with the directory it was
# started from mounted (read-only) at /workspace, which is also the working directory.
set -eu
echo "provisioning build $AMIDALA_BUILD_ID from $AMIDALA_SOURCE_SNAPSHOT"
mkdir -p /usr/local/share/hello
cp files/hello.txt /usr/local/share/hello/
cat > /etc/motd <<MOTD
Welcome to an image baked by amidala.
build: $AMIDALA_BUILD_ID
MOTD
echo "done: $(wc -c < /etc/motd) bytes of motd"
