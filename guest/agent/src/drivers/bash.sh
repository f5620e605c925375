# exec-sandbox bash driver, run as `bash --noprofile --norc -c <this file>` by the guest agent.
#
# Commands arrive on fd 3: "<nonce> <env_len> <code_len>\n" <env: "NAME=VALUE\n"...> <code>.
# Each is answered on fd 4 with "<nonce> <status>\n" ("ready\n" once at start); an empty command
# is the agent's barrier, answered "<nonce> 0" from the loop. Code runs with
# eval in this shell, so variables, functions and the working directory persist. Lengths are in
# bytes, hence LC_ALL=C for the reads.
#
# `set -x` in user code must trace only user code. The driver's own commands run in groups
# with stderr on /dev/null (their trace goes there too), and xtrace is switched off before
# `eval` and back on as the first command inside it, so neither the loop nor `eval` itself is
# ever traced. (Commands inside eval are one level deeper: with the default PS4 their trace
# lines start with `++`.)
builtin printf 'ready\n' >&4
while {
    # Reset on every command: user code runs in this shell and may have changed them.
    __sbx_nl=$'\n' __sbx_name='^[A-Za-z_][A-Za-z0-9_]*$'
    LC_ALL=C IFS=' ' builtin read -r __sbx_nonce __sbx_elen __sbx_clen <&3 || builtin exit 0
    __sbx_env='' __sbx_code=''
    if ((__sbx_elen > 0)); then
        LC_ALL=C IFS= builtin read -r -N "$__sbx_elen" __sbx_env <&3 || builtin exit 0
    fi
    if ((__sbx_clen > 0)); then
        LC_ALL=C IFS= builtin read -r -N "$__sbx_clen" __sbx_code <&3 || builtin exit 0
    fi
    __sbx_keys=() __sbx_had=() __sbx_old=()
    while [[ -n $__sbx_env ]]; do
        __sbx_kv=${__sbx_env%%"$__sbx_nl"*}
        if [[ $__sbx_env == *"$__sbx_nl"* ]]; then
            __sbx_env=${__sbx_env#*"$__sbx_nl"}
        else
            __sbx_env=''
        fi
        __sbx_k=${__sbx_kv%%=*}
        # Names are data: the agent has refused any name that is not an identifier or is
        # reserved, and one that slipped through is skipped, never evaluated.
        if ! [[ $__sbx_k =~ $__sbx_name && ${__sbx_k^^} != __SBX* ]]; then
            continue
        fi
        __sbx_keys+=("$__sbx_k")
        if [[ -v $__sbx_k ]]; then
            __sbx_had+=(1) && __sbx_old+=("${!__sbx_k}")
        else
            __sbx_had+=(0) && __sbx_old+=('')
        fi
        builtin export -- "$__sbx_k=${__sbx_kv#*=}"
    done
    __sbx_xtrace=''
    if [[ $- == *x* ]]; then
        __sbx_xtrace='builtin set -x; '
        builtin set +x
    fi
} 2>/dev/null; do
    # An empty command is the agent's barrier: answered from the loop, nothing evaluated.
    if ((__sbx_elen == 0 && __sbx_clen == 0)); then
        {
            builtin printf '%s 0\n' "$__sbx_nonce" >&4
            [[ -n $__sbx_xtrace ]] && builtin set -x
            builtin continue
        } 2>/dev/null
    fi
    eval "$__sbx_xtrace$__sbx_code" 3<&- 4>&-
    {
        __sbx_st=$?
        # A syntax error stops eval before its first command: keep the user's xtrace on.
        if [[ -n $__sbx_xtrace && $__sbx_st == 2 && $- != *x* ]]; then
            builtin set -x
        fi
        for __sbx_i in "${!__sbx_keys[@]}"; do
            if [[ ${__sbx_had[__sbx_i]} == 1 ]]; then
                builtin export "${__sbx_keys[__sbx_i]}=${__sbx_old[__sbx_i]}"
            else
                builtin unset "${__sbx_keys[__sbx_i]}"
            fi
        done
        builtin printf '%s %d\n' "$__sbx_nonce" "$__sbx_st" >&4
    } 2>/dev/null
done
