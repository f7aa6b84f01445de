@echo off
rem Build dist\chat_server.pyz and dist\chat_client.pyz on Windows: "build.bat" or "build.bat OUTDIR".
rem Run them with "py -3 dist\chat_server.pyz". The Python part is the one in build.sh, read from
rem between its BEGIN BUILDER and END BUILDER lines, so both scripts build the same bytes.
setlocal
set "OUT=%~1"
if "%OUT%"=="" set "OUT=%~dp0dist"
cd /d "%~dp0"
set "PY="
py -3 -c "import sys; sys.exit(sys.version_info < (3, 8))" >nul 2>&1 && set "PY=py -3"
if not defined PY python -c "import sys; sys.exit(sys.version_info < (3, 8))" >nul 2>&1 && set "PY=python"
if not defined PY python3 -c "import sys; sys.exit(sys.version_info < (3, 8))" >nul 2>&1 && set "PY=python3"
if not defined PY (
  echo build.bat: Python 3.8 or newer not found ^(tried py -3, python, python3^); install it from python.org 1>&2
  exit /b 1
)
%PY% -c "src = open('build.sh', encoding='utf-8').read(); exec(src.split('# BEGIN BUILDER\n')[1].split('# END BUILDER\n')[0])" "%OUT%"
exit /b %ERRORLEVEL%
