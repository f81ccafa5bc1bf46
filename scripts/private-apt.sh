# Sourced by the set-up scripts (needs $cache). Never edits the system's apt
# configuration: each private apt directory $cache/apt-NAME has its own
# sources, lists and archives.
#
# private_apt NAME TYPES SUITE...: sets APT_OPTS (options for apt-get and
# apt-cache) for a private copy of this machine's Debian mirror with only
# SUITE... (main component), e.g. `private_apt sid deb-src sid`.
# The lists are fetched when missing or when the sources changed; call
# private_apt_update to fetch them again (a suite that moves, like sid, drops
# files that an old list still names).
private_apt() {
  local name=$1 types=$2; shift 2
  local dir=$cache/apt-$name uri keyring=/usr/share/keyrings/debian-archive-keyring.gpg
  # The system's main mirror: first URI of a non-security deb822 stanza, or
  # the first non-security one-line `deb` entry.
  uri=$( { awk -v RS= '!/-security/' /etc/apt/sources.list.d/debian.sources 2>/dev/null \
             | awk '/^URIs:/ {print $2; exit}'
           grep -hs '^deb ' /etc/apt/sources.list | grep -v -- -security | awk '{print $2; exit}'
         } | head -n 1) || true
  [ -n "$uri" ] || { echo "private_apt: no Debian mirror in this machine's apt sources" >&2; return 1; }
  mkdir -p "$dir/lists/partial" "$dir/archives/partial" "$dir/sources"
  printf 'Types: %s\nURIs: %s\nSuites: %s\nComponents: main\nSigned-By: %s\n' \
    "$types" "$uri" "$*" "$keyring" > "$dir/sources/debian.sources.new"
  if ! cmp -s "$dir/sources/debian.sources.new" "$dir/sources/debian.sources"; then
    rm -f "$dir/sources/"*.list "$dir/lists/.updated"
    mv "$dir/sources/debian.sources.new" "$dir/sources/debian.sources"
  else
    rm -f "$dir/sources/debian.sources.new"
  fi
  APT_OPTS=(-o "Dir::Etc::SourceList=/dev/null" -o "Dir::Etc::SourceParts=$dir/sources"
            -o "Dir::State::Lists=$dir/lists" -o "Dir::Cache::Archives=$dir/archives"
            -o "Dir::Cache::pkgcache=" -o "Dir::Cache::srcpkgcache=")
  PRIVATE_APT_DIR=$dir
  [ -e "$dir/lists/.updated" ] || private_apt_update
}

# private_apt_update: fetch the lists of the last private_apt again.
private_apt_update() {
  apt-get "${APT_OPTS[@]}" update -qq
  touch "$PRIVATE_APT_DIR/lists/.updated"
}
